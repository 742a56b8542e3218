"""AnimateDiff-family trainer: losses fall on a fixed batch, resume equals an uninterrupted run, and a complete
(very short) run exports files that the loader nodes, the runtime and `kineflow inspect` read back."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kineflow.models.animatediff import MotionModule, config_from_state_dict
from kineflow.models.sd15_unet import SD15UNet
from kineflow.models.sd_vae import SDVAE
from kineflow.runtime import animatediff as ad_runtime
from kineflow.runtime import cli, host
from kineflow.errors import KineFlowError
from kineflow.runtime.executor import run_workflow
from kineflow.training import train
from kineflow.training import train_animatediff as ta
from kineflow.training.common import Budget, load_checkpoint
from kineflow.shapes.dataset import ShapesVideoDataset
from kineflow.training.tiny_sd import TINY_UNET, TINY_VAE, tiny_motion_config
from shipped_checks import CARD_SECTIONS

VAE = ta.VAESettings(encoder_steps=1, decoder_steps=1, steps=2, batch_size=2, crop=16, clips=4, save_every=1,
                     log_every=1)
TEXT = ta.TextSettings(steps=2, batch_size=4, clips=8, warmup=1, save_every=1, log_every=1)
UNET = ta.UNetSettings(steps=4, batch_size=4, clips=3, warmup=2, save_every=2, log_every=1)
MOTION = ta.MotionSettings(steps=2, batch_size=1, clips=2, warmup=2, save_every=1, log_every=1)
WORKFLOW = Path(__file__).parent / "data" / "workflows" / "animatediff_tiny_random_api.json"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """A complete (very short) run: VAE phases, CLIP caption parser, cache, UNet, motion module."""
    run_dir = tmp_path_factory.mktemp("ad_run")
    assert ta.train_vae(run_dir, VAE).finished
    assert ta.train_text(run_dir, TEXT).finished
    assert ta.train_unet(run_dir, UNET).finished
    assert ta.train_motion(run_dir, MOTION).finished
    return run_dir


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fit(parameters, loss_of, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(parameters, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fixed_frames() -> torch.Tensor:
    video = train.video_batch(ShapesVideoDataset(length=2), [0, 1])[0]
    return video[:, :, 0, :16, :16]


def test_vae_phase_losses_fall_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = SDVAE(TINY_VAE)
    head = ta.PatchDecoder(vae)
    frames = _fixed_frames()
    assert head(vae.encode(frames).mean).shape == frames.shape
    gen = lambda: torch.Generator().manual_seed(0)
    encoder = [*vae.encoder.parameters(), *vae.quant_conv.parameters(), *head.parameters()]
    # Posterior noise (std ~1 at first) hides the latents until the encoder's means outgrow it: a high rate.
    losses = _fit(encoder, lambda: ta.encoder_loss(vae, head, frames, gen(), VAE), 20, 1e-2)
    assert losses[-1] < 0.75 * losses[0], losses
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    losses = _fit(decoder, lambda: ta.decoder_loss(vae, frames, gen(), VAE), 15, 2e-3)
    assert losses[-1] < 0.6 * losses[0], losses
    assert torch.isfinite(ta.vae_loss(vae, frames, gen(), VAE))


def test_folding_the_latent_scale_keeps_reconstructions():
    torch.manual_seed(0)
    vae = SDVAE(TINY_VAE).eval()
    frames = _fixed_frames()
    with torch.no_grad():
        before, recon = vae.encode(frames), vae(frames)
        ta.fold_latent_scale(vae, 3.0)
        after = vae.encode(frames)
        torch.testing.assert_close(after.mean, 3.0 * before.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(after.std, 3.0 * before.std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vae(frames), recon, rtol=1e-4, atol=1e-4)


def _random_cache(clips: int = 2, frames: int = 4) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(clips, 4, frames, 8, 8, generator=gen),
            "context": torch.randn(clips, 77, TINY_UNET.context_dim, generator=gen),
            "uncond": torch.randn(1, 77, TINY_UNET.context_dim, generator=gen)}


def test_unet_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    unet = SD15UNet(TINY_UNET)
    cache = _random_cache()
    loss_of = lambda: ta.unet_loss(unet, cache, [0, 1, 0, 1], [0, 1, 2, 3],
                                   torch.Generator().manual_seed(0), UNET)
    losses = _fit(unet.parameters(), loss_of, 25, 2e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_clip_learns_to_parse_captions_through_the_states_the_unet_reads():
    torch.manual_seed(0)
    clip, tokenizer = ta.CLIPTextModel(ta.TINY_CLIP), ta.clip_l_tokenizer()
    heads = train.SceneHeads(ta.TINY_CLIP.hidden_size)
    specs, captions = zip(*(ShapesVideoDataset(length=8).spec_and_caption(i) for i in range(8)))
    states_of = lambda c: ta.clip_states(clip, tokenizer, c)
    states, mask = states_of(list(captions[:2]))
    assert states.shape == (2, 77, ta.TINY_CLIP.hidden_size) and mask[:, 0].all() and not mask[:, -1].any()
    losses = _fit([*clip.parameters(), *heads.parameters()],
                  lambda: train.text_loss(states_of, heads, list(captions), specs), 30, 3e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_motion_module_starts_as_the_image_model_and_its_loss_falls():
    torch.manual_seed(0)
    unet = SD15UNet(TINY_UNET).requires_grad_(False)
    motion = MotionModule(tiny_motion_config(MOTION.version))
    cache = _random_cache()
    x = cache["latents"][0].transpose(0, 1)
    t, context = torch.full((4,), 500.0), cache["context"][:1].expand(4, -1, -1)
    with torch.no_grad():  # proj_out starts at zero, as AnimateDiff trains it: the image model's output at first
        torch.testing.assert_close(unet(x, t, context, video_frames=4, temporal=motion), unet(x, t, context))
    loss_of = lambda: ta.motion_loss(unet, motion, cache, [0, 1], torch.Generator().manual_seed(0),
                                     MOTION)
    losses = _fit(motion.parameters(), loss_of, 25, 2e-3)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in unet.parameters())


def test_high_noise_weight_counts_clips_by_their_x0_error_up_to_the_cap():
    t = torch.tensor([0, 300, 500, 999])
    weights = ta.high_noise_weights(t, 25.0)
    a = ta.ALPHAS_CUMPROD[t]
    assert weights[0] == 1.0 and weights[-1] == 25.0  # floored at 1, capped
    assert weights[1:3].tolist() == pytest.approx(((1 - a[1:3]) / a[1:3]).tolist())
    assert ta.high_noise_weights(t, 1.0).tolist() == [1.0] * 4
    # cap 1 is AnimateDiff's plain epsilon MSE; a larger cap changes the loss of a mixed-timestep batch
    torch.manual_seed(0)
    unet = SD15UNet(TINY_UNET).requires_grad_(False)
    motion = MotionModule(tiny_motion_config(MOTION.version))
    cache = _random_cache(clips=4)
    loss = lambda cap: ta.motion_loss(unet, motion, cache, [0, 1, 2, 3], torch.Generator().manual_seed(3),
                                      dataclasses.replace(MOTION, high_noise_weight=cap)).item()
    assert loss(1.0) != pytest.approx(loss(25.0), rel=1e-3)
    frames = lambda cap: ta.unet_loss(unet, cache, [0, 1, 2, 3], [0, 1, 2, 3], torch.Generator().manual_seed(3),  # noqa: E731
                                      dataclasses.replace(UNET, high_noise_weight=cap)).item()
    assert frames(1.0) != pytest.approx(frames(25.0), rel=1e-3)
    # cap 1 is exactly the plain MSE; otherwise each sample's MSE counts by its weight
    pred, target = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(4)), torch.zeros(4, 3, 5)
    per_sample = pred.square().mean(dim=(1, 2))
    assert ta.weighted_mse(pred, target, t, 1.0).item() == pytest.approx(pred.square().mean().item(), rel=1e-6)
    assert ta.weighted_mse(pred, target, t, 25.0).item() == pytest.approx(
        ((weights * per_sample).sum() / weights.sum()).item(), rel=1e-6)


@pytest.mark.parametrize("settings", [ta.UNetSettings, ta.MotionSettings])
def test_a_high_noise_weight_below_one_is_refused(settings):
    with pytest.raises(KineFlowError, match="must be >= 1"):
        settings(high_noise_weight=0.5)


def test_resume_continues_exactly(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    for name in ("vae", "text", "cache"):  # reuse the finished VAE, CLIP and cache
        (run_dir / name).mkdir(parents=True)
        for path in (trained_run / name).iterdir():
            (run_dir / name / path.name).write_bytes(path.read_bytes())
    # UNet: an exhausted budget stops before any step; then 2 steps, then resume to 4 == 4 steps at once.
    stopped = ta.train_unet(run_dir, UNET, budget=Budget(minutes=1e-9))
    assert (stopped.finished, stopped.step) == (False, 0)
    ta.train_unet(run_dir, dataclasses.replace(UNET, steps=2), resume=True)
    with pytest.raises(KineFlowError, match="lr"):
        ta.train_unet(run_dir, dataclasses.replace(UNET, lr=1e-2), resume=True)
    result = ta.train_unet(run_dir, UNET, resume=True)
    assert (result.finished, result.steps_run) == (True, 2)
    whole, resumed = (load_checkpoint(d / "unet" / "ckpt.pt") for d in (trained_run, run_dir))
    assert _states_equal(whole["model"], resumed["model"])
    assert all(torch.equal(whole["optimizer"]["state"][k]["exp_avg"], resumed["optimizer"]["state"][k]["exp_avg"])
               for k in whole["optimizer"]["state"])
    logged = [json.loads(line)["step"] for line in (run_dir / "unet" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    # Motion module: 1 step, then resume to 2 == 2 steps at once.
    ta.train_motion(run_dir, dataclasses.replace(MOTION, steps=1))
    with pytest.raises(KineFlowError, match="--resume"):
        ta.train_motion(run_dir, MOTION)
    ta.train_motion(run_dir, MOTION, resume=True)
    whole, resumed = (load_checkpoint(d / "motion" / "ckpt.pt") for d in (trained_run, run_dir))
    assert _states_equal(whole["model"], resumed["model"])


def test_unet_stage_needs_the_trained_text_encoder(trained_run, tmp_path):
    (tmp_path / "vae").mkdir()
    for path in (trained_run / "vae").iterdir():
        (tmp_path / "vae" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(KineFlowError, match="run the 'text' stage first"):
        ta.train_unet(tmp_path, UNET)


def cli_inspect(path) -> dict:
    stdout = io.StringIO()
    assert cli.main(["inspect", str(path), "--json"], stdout=stdout, stderr=io.StringIO()) == 0
    return json.loads(stdout.getvalue())


def test_export_loads_back_through_the_runtime_and_the_nodes(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "weights"
    paths = ta.export(trained_run, out)
    assert sum(train._size_mb(p) for p in paths.values()) < train.SIZE_LIMIT_MB
    card = paths["card"].read_text()
    assert "KineFlow tiny AnimateDiff" in card
    assert [line for line in card.splitlines() if line.startswith("## ")] == CARD_SECTIONS
    checkpoint, motion_info = cli_inspect(paths["checkpoint"]), cli_inspect(paths["motion"])
    assert (checkpoint["family"], checkpoint["layout"]) == ("sd15_checkpoint", "ldm")
    assert (motion_info["family"], motion_info["version"]) == ("animatediff_motion_module", MOTION.version)
    assert set(checkpoint["dtypes"]) == set(motion_info["dtypes"]) == {"F16"}

    monkeypatch.setattr(host._Standalone, "models_dir", host._Standalone.models_dir)
    host.configure(models_dir=out)
    model, vae, encoder = ad_runtime.load_sd_checkpoint("kineflow_tiny_sd15.safetensors")
    motion = ad_runtime.load_motion_module("kineflow_tiny_mm.safetensors")
    animated = ad_runtime.apply_motion_module(model, motion)
    # The checkpoint carries latent -> RGB preview factors fitted to its VAE, and the model previews with them.
    fitted = json.loads(ta.preview_factors_metadata(vae.vae, VAE.seed, VAE.clips))
    assert torch.allclose(animated.preview_factors[0], torch.tensor(fitted["factors"]), atol=1e-5)
    assert torch.allclose(animated.preview_factors[1], torch.tensor(fitted["bias"]), atol=1e-5)

    # The shipped CLIP and VAE reproduce the cached training data (fp16 weights, computed in float32).
    cache = torch.load(ta.cache_path(trained_run), weights_only=True)
    torch.testing.assert_close(encoder.encode(cache["captions"][:2])["context"], cache["context"][:2])
    torch.testing.assert_close(encoder.encode([""])["context"], cache["uncond"])
    video = train.video_batch(ShapesVideoDataset(length=1, seed=UNET.seed, frames=ta.RENDER_FRAMES), [0])[0]
    torch.testing.assert_close(vae.vae.encode_frames(video[:, :, :ta.CLIP_FRAMES]), cache["latents"][:1])
    trained_vae, _ = ta.load_trained_vae(trained_run)
    frames = ta._fit_frames(ShapesVideoDataset(length=VAE.clips, seed=VAE.seed), VAE)
    scaled = torch.cat([trained_vae.encode_latents(f) for f in frames])
    assert scaled.std().item() == pytest.approx(1.0, abs=1e-2)  # the fold makes SD1.5's 0.18215 give unit std

    # The loaded model with the motion module is the network the motion stage trained.
    unet, _ = ta.load_trained_unet(trained_run, torch.float16)
    trained_motion = MotionModule(tiny_motion_config(MOTION.version))
    trained_motion.load_state_dict(load_checkpoint(trained_run / "motion" / "ckpt.pt")["model"])
    x, t = cache["latents"][:1], torch.tensor([300.0])
    context = cache["context"][:1]
    got = animated.net_fn(x, t, **animated.net_kwargs({"context": context}, 1.0, 1))
    with torch.no_grad():
        frames_in = x.transpose(1, 2).flatten(0, 1)
        expected = unet(frames_in, t.repeat(ta.CLIP_FRAMES), context.repeat(ta.CLIP_FRAMES, 1, 1),
                        video_frames=ta.CLIP_FRAMES, temporal=trained_motion)
    torch.testing.assert_close(got, expected.unflatten(0, (1, ta.CLIP_FRAMES)).transpose(1, 2), rtol=1e-3, atol=1e-3)

    # The loader nodes in the AnimateDiff workflow: checkpoint -> motion module -> sampler (with CFG) -> decode.
    results = run_workflow(str(WORKFLOW), overrides=['1.ckpt_name="kineflow_tiny_sd15.safetensors"',
                                                     '2.model_name="kineflow_tiny_mm.safetensors"', "6.cfg=2.0",
                                                     "6.steps=2"],
                           models_dir=out, output_dir=tmp_path / "output")
    frames_out = results["7"]["outputs"][0]
    assert frames_out.shape == (ta.CLIP_FRAMES, 64, 64, 3) and bool(torch.isfinite(frames_out).all())


def test_cli_parses_every_stage_and_reports_a_missing_run(tmp_path, capsys):
    parser = ta.build_parser()
    args = parser.parse_args(["all", "--vae-steps", "3", "--unet-batch-size", "8", "--motion-version", "v3"])
    assert train._settings(args, ta.VAESettings, "vae_").steps == 3
    assert train._settings(parser.parse_args(["all", "--text-steps", "7"]), ta.TextSettings, "text_").steps == 7
    assert train._settings(args, ta.UNetSettings, "unet_").batch_size == 8
    assert train._settings(args, ta.MotionSettings, "motion_").version == "v3"
    assert parser.parse_args(["motion", "--steps", "5"]).steps == 5
    empty = ["--run-dir", str(tmp_path / "empty"), "--threads", "1"]
    assert ta.main(["export", *empty, "--out", str(tmp_path / "w")]) == 2
    assert "run the 'motion' stage first" in capsys.readouterr().err
    assert ta.main(["motion", *empty]) == 2
    assert "run the 'unet' stage first" in capsys.readouterr().err


def test_motion_for_an_existing_checkpoint_with_its_cross_attention_trained(trained_run, tmp_path):
    """`--base-checkpoint` animates an exported SD1.5 file; with `--cross-attention trained` the UNet's attn2
    layers (the only path from the prompt to the text-blind motion module) train too, and nothing else of it."""
    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(base), cross_attention="trained")
    run_dir = tmp_path / "run"
    assert ta.train_motion(run_dir, settings).finished
    with pytest.raises(KineFlowError, match="not a file"):
        ta.train_motion(tmp_path / "other", dataclasses.replace(settings, base_checkpoint=str(tmp_path / "none")))
    paths = ta.export(run_dir, tmp_path / "weights")
    assert f"taken from `{base.name}`" in paths["card"].read_text()
    assert "cross-attention layers (attn2)" in paths["card"].read_text()
    before, after = (load_file(str(p)) for p in (base, paths["checkpoint"]))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2." in k for k in changed), sorted(changed)[:5]
    assert cli_inspect(paths["motion"])["family"] == "animatediff_motion_module"
    with safe_open(str(paths["checkpoint"]), "pt") as f:
        record = json.loads(f.metadata()["kineflow.training"])
    assert record["image_model"] == base.name and record["unet_steps"] == UNET.steps



def test_motion_with_the_whole_unet_trained_changes_unet_weights_beyond_attn2(trained_run, tmp_path):
    """`--unet trained` fine-tunes every UNet layer with the motion module; the VAE and CLIP stay the base's."""
    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    run_dir = tmp_path / "run"
    assert ta.train_motion(run_dir, dataclasses.replace(MOTION, base_checkpoint=str(base), unet="trained")).finished
    paths = ta.export(run_dir, tmp_path / "weights")
    assert "the whole UNet training with it" in paths["card"].read_text()
    before, after = (load_file(str(p)) for p in (base, paths["checkpoint"]))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".attn2." not in k and k.startswith(ta.UNET_PREFIX) for k in changed)
    assert all(k.startswith(ta.UNET_PREFIX) for k in changed), sorted(changed)[:5]


def test_motion_decay_steps_lower_the_learning_rate_to_the_end_and_may_be_set_on_resume(trained_run, tmp_path):
    """A long motion run is resumed with `--decay-steps` to anneal it: the learning rate of the last N steps falls
    linearly, and the resumed run accepts the new setting."""
    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(base), warmup=1, steps=2)
    run_dir = tmp_path / "run"
    assert ta.train_motion(run_dir, settings).finished
    assert ta.train_motion(run_dir, dataclasses.replace(settings, steps=4, decay_steps=2), resume=True).finished
    rates = [json.loads(line)["lr"] for line in (run_dir / "motion" / "log.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([settings.lr] * 3 + [settings.lr / 2])


def test_motion_continues_an_exported_module_on_a_new_cache(trained_run, tmp_path):
    """`--init-module` starts a new motion run (e.g. on more clips) from an exported module and the checkpoint
    exported beside it: trained with a zero learning rate it exports the module it started from, trained for real
    it moves on, and its export records the runs it continues; a module of another version is refused with what
    was expected."""
    exported = ta.export(trained_run, tmp_path / "first")
    settings = dataclasses.replace(MOTION, base_checkpoint=str(exported["checkpoint"]), clips=3,
                                   init_module=str(exported["motion"]), steps=1)

    def motion_of(run_dir: Path, lr: float) -> dict:
        assert ta.train_motion(run_dir, dataclasses.replace(settings, lr=lr)).finished
        return load_file(str(ta.export(run_dir, run_dir / "export")["motion"]))

    start = load_file(str(exported["motion"]))
    assert _states_equal(motion_of(tmp_path / "still", 0.0), start)  # a zero learning rate keeps the start
    assert not _states_equal(motion_of(tmp_path / "run", settings.lr), start)
    with pytest.raises(KineFlowError, match="expected the tiny v1 motion module"):
        ta.train_motion(tmp_path / "v1", dataclasses.replace(settings, version="v1"))
    with pytest.raises(KineFlowError, match="not a file"):
        ta.train_motion(tmp_path / "none", dataclasses.replace(settings, init_module=str(tmp_path / "none.safetensors")))
    # The continued module carries the runs behind it, even once the files it started from are gone.
    first_steps = ta.motion_history(exported["motion"])[0]["motion_steps"]
    shutil.rmtree(tmp_path / "first")
    continued = tmp_path / "run" / "export" / ta.NAMES["motion"]
    assert [run["motion_steps"] for run in ta.motion_history(continued)] == [1, first_steps]
    card = (tmp_path / "run" / "export" / ta.CARD_NAME).read_text()
    assert f"({1 + first_steps} motion steps in all with this one)" in card and "zero-initialised" not in card


def test_a_wider_unet_gets_a_wider_motion_module_and_exports_like_the_default(trained_run, tmp_path):
    """`unet --model-channels 64` trains a UNet twice as wide; the motion stage builds its module at the UNet's
    widths, and the export reads back through the normal loaders at those widths. Widths the group norms and
    heads cannot split are refused."""
    for part in trained_run.iterdir():  # the run's VAE, text encoder and cache; the new UNet replaces its own
        if part.is_dir() and part.name not in ("unet", "motion"):
            shutil.copytree(part, tmp_path / part.name)
    assert ta.train_unet(tmp_path, dataclasses.replace(UNET, model_channels=64, steps=1)).finished
    assert ta.train_motion(tmp_path, dataclasses.replace(MOTION, steps=1)).finished
    exported = ta.export(tmp_path, tmp_path / "export")
    unet, _, _ = ta.load_base_checkpoint(exported["checkpoint"])
    assert unet.config.level_channels() == [64, 128]
    assert config_from_state_dict(load_file(str(exported["motion"]))).block_channels == (64, 128)
    with pytest.raises(KineFlowError, match="multiple of 32.*got 48"):
        ta.UNetSettings(model_channels=48)


def test_a_checkpoint_whose_unet_trained_further_reuses_the_cache_of_its_vae_and_clip(trained_run, tmp_path,
                                                                                   monkeypatch):
    """The motion stage's cache holds VAE latents and CLIP states only, so it is keyed by those weights: the
    checkpoint a cross-attention-trained motion run exports (new attn2, same VAE and CLIP) reuses a cache made
    with the checkpoint it started from, while a changed VAE is not served a stale cache."""
    first = ta.export(trained_run, tmp_path / "first")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(first), cross_attention="trained", clips=3)
    assert ta.train_motion(tmp_path / "a", settings).finished
    second = ta.export(tmp_path / "a", tmp_path / "second")
    before, after = load_file(str(first)), load_file(str(second["checkpoint"]))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # attn2 trained
    (tmp_path / "b" / "cache").mkdir(parents=True)
    shutil.copy(ta.cache_path(tmp_path / "a"), ta.cache_path(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "b" / "cache", tmp_path / "c" / "cache")
    monkeypatch.setattr(ta.shapes, "ShapesVideoDataset", lambda *a, **k: pytest.fail("the cache was rebuilt"))
    assert ta.train_motion(tmp_path / "b", dataclasses.replace(settings, base_checkpoint=str(second["checkpoint"]),
                                                               init_module=str(second["motion"]))).finished
    changed_vae = {k: v + 0.01 if k.startswith(ta.VAE_PREFIX) and v.is_floating_point() else v
                   for k, v in after.items()}
    save_file(changed_vae, str(tmp_path / "changed.safetensors"))
    with pytest.raises(pytest.fail.Exception, match="the cache was rebuilt"):
        ta.train_motion(tmp_path / "c", dataclasses.replace(settings, base_checkpoint=str(tmp_path / "changed.safetensors")))


def test_motion_cache_takes_the_share_of_two_shape_clips_asked_for(trained_run, tmp_path):
    """`--two-shape-prob` sets the share of two-shape clips the motion stage trains on (the AnimateDiff module's
    weak case); it is part of the cache's key, so a cache of another share is not reused."""
    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(base), clips=4, two_shape_prob=1.0)
    assert ta.train_motion(tmp_path / "run", settings).finished
    cache = torch.load(ta.cache_path(tmp_path / "run"), weights_only=True)
    data = ShapesVideoDataset(length=4, seed=settings.seed, split="train", frames=ta.RENDER_FRAMES,
                              two_shape_prob=1.0)
    specs, captions = zip(*(data.spec_and_caption(i) for i in range(4)))
    assert cache["captions"] == list(captions) and all(len(spec.shapes) == 2 for spec in specs)
    assert cache["key"]["two_shape_prob"] == 1.0


def test_motion_with_extended_captions_trains_on_new_phrasings_of_the_cached_scenes(trained_run, tmp_path):
    """`--caption-templates extended` re-captions each step's cached clips (scene regenerated from the cache's
    seed and index) from the training + extra templates, encodes them with the frozen CLIP, and trains on those
    states instead of the cached ones."""
    from kineflow.shapes.prompts import parse_prompt

    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(base), clips=4, two_shape_prob=0.5,
                                   caption_templates="extended")
    assert ta.train_motion(tmp_path / "run", settings).finished
    cache = torch.load(ta.cache_path(tmp_path / "run"), weights_only=True)
    _, _, encoder = ta.load_base_checkpoint(base)
    live = ta.CaptionStates(settings, encoder, cache)
    clips = [0, 1, 2, 3] * 5
    captions = live.captions(clips, np.random.default_rng(0))
    assert [parse_prompt(c) for c in captions] == [parse_prompt(cache["captions"][i]) for i in clips]
    assert any(c != cache["captions"][i] for c, i in zip(captions, clips))
    states, uncond = live.states(clips[:4], np.random.default_rng(0))
    assert states.shape == cache["context"][:4].shape and not torch.allclose(states, cache["context"][:4])
    torch.testing.assert_close(uncond, cache["uncond"])  # the frozen CLIP's empty prompt, as cached
    assert not states.requires_grad
    with pytest.raises(SystemExit):
        ta.build_parser().parse_args(["motion", "--run-dir", str(tmp_path), "--caption-templates", "heldout"])


def test_motion_with_the_text_encoder_trained_exports_the_new_clip(trained_run, tmp_path):
    """`--text-encoder trained` trains CLIP (and, as it implies, the UNet's attn2) with the motion module, on
    states encoded each step, and the export carries the trained CLIP; the VAE and the rest of the UNet stay the
    base's."""
    base = ta.export(trained_run, tmp_path / "base")["checkpoint"]
    settings = dataclasses.replace(MOTION, base_checkpoint=str(base), clips=3, text_encoder="trained")
    assert ta.train_motion(tmp_path / "run", settings).finished
    paths = ta.export(tmp_path / "run", tmp_path / "weights")
    before, after = (load_file(str(p)) for p in (base, paths["checkpoint"]))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith(ta.CLIP_PREFIX) for k in changed) and any(".attn2." in k for k in changed)
    assert all(k.startswith(ta.CLIP_PREFIX) or ".attn2." in k for k in changed), sorted(changed)[:5]
    assert "the CLIP text encoder trained with it too" in paths["card"].read_text()
    _, _, encoder = ta.load_base_checkpoint(paths["checkpoint"])
    assert encoder.encode(["a red ball moves left on a blue background"])["context"].shape == (1, 77, 64)
