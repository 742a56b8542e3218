"""Trainer: loss goes down on a fixed batch, resume equals an uninterrupted run, exports load back."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer

from kineflow.models.checkpoints import read_header
from kineflow.runtime import cli, host
from kineflow.errors import KineFlowError
from kineflow.runtime.video_models import load_text_encoders, load_video_model, load_video_vae
from kineflow.training import train
from kineflow.training.common import Budget, load_checkpoint, step_rngs
from kineflow.shapes.dataset import ShapesVideoDataset
from kineflow.training.tiny_models import write_word_tokenizer
from shipped_checks import CARD_SECTIONS

VAE = train.VAESettings(encoder_steps=1, decoder_steps=1, steps=2, batch_size=1, crop=16, clips=4, save_every=1, log_every=1)
DIT = train.DiTSettings(steps=4, batch_size=4, clips=6, warmup=2, save_every=2, log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """A complete (very short) run: VAE, frozen text encoders + cache, transformer."""
    run_dir = tmp_path_factory.mktemp("run")
    assert train.train_vae(run_dir, VAE).finished
    assert train.train_dit(run_dir, DIT).finished
    return run_dir


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_covers_every_caption_word(tmp_path):
    tokenizer = Tokenizer.from_file(str(write_word_tokenizer(tmp_path, train.caption_vocabulary()) / "tokenizer.json"))
    unk = tokenizer.token_to_id("[UNK]")
    for data in (ShapesVideoDataset(length=300, split="train"), ShapesVideoDataset(length=300, split="heldout")):
        for i in range(len(data)):
            text = data.spec_and_caption(i)[1]
            assert unk not in tokenizer.encode(text).ids, text


def test_vae_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = train.HunyuanVideoVAE(train.build_family(1).vae)
    video = train.video_batch(ShapesVideoDataset(length=2), [0, 1])[0][:, :, :5, :16, :16]
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = train.vae_loss(vae, video, torch.Generator().manual_seed(0), VAE)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_dit_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    family = train.build_family(40)
    dit = train.trainable_dit(family.dit)
    assert dit.guidance_in is None
    # The training copy of the q/k norm computes what the inference one does, under the same parameter names.
    reference = train.dit_mod.HunyuanVideoDiT(family.dit)
    assert dit.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 5, 2, 32)
    norm = dit.double_blocks[0].img_attn_q_norm
    assert type(norm) is not type(reference.double_blocks[0].img_attn_q_norm)
    torch.testing.assert_close(norm(x), reference.double_blocks[0].img_attn_q_norm(x))
    n, length = 4, 5
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, 3:] = 0
    cache = {"latents": torch.randn(n, 16, 2, 4, 4), "text_states": torch.randn(n, length, 128),
             "text_mask": mask, "text_states_2": torch.randn(n, 64), "uncond_states": torch.randn(1, length, 128),
             "uncond_mask": mask[:1], "uncond_states_2": torch.randn(1, 64)}
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = train.dit_loss(dit, cache, range(n), torch.Generator().manual_seed(0), DIT)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses

    # --foreground-weight: on clips of a flat background and a shape, the shape's cells weigh more
    shapes = torch.zeros(n, 16, 2, 8, 8)
    shapes[:, :, :, 2:4, 2:4] = 2.0
    cache = {**cache, "latents": shapes}
    plain = train.dit_loss(dit, cache, range(n), torch.Generator().manual_seed(0), DIT)
    weighted = train.dit_loss(dit, cache, range(n), torch.Generator().manual_seed(0),
                              dataclasses.replace(DIT, foreground_weight=3.0))
    assert torch.isfinite(weighted) and weighted.item() != plain.item()
    later = train.dit_loss(dit, cache, range(n), torch.Generator().manual_seed(0),
                           dataclasses.replace(DIT, later_frame_weight=4.0))
    assert torch.isfinite(later) and later.item() != plain.item()


def test_foreground_cells_are_the_shape_and_its_border():
    background = torch.tensor([0.3, -1.0, 2.0, 0.0]).view(1, 4, 1, 1, 1)
    latents = background.expand(2, 4, 3, 8, 8).clone()
    latents[0, :, :, 2:4, 3:5] += 1.5  # a 2x2-cell shape in clip 0; clip 1 is all background
    cells = train.foreground_cells(latents)
    assert cells.shape == (2, 1, 3, 8, 8)
    expected = torch.zeros(8, 8)
    expected[1:5, 2:6] = 1.0  # grown by one cell
    assert all(torch.equal(cells[0, 0, t], expected) for t in range(3))
    assert cells[1].sum() == 0


def test_step_randomness_depends_only_on_seed_stage_and_step():
    a_np, a_torch = step_rngs(0, "dit", 7)
    b_np, b_torch = step_rngs(0, "dit", 7)
    assert a_np.integers(1 << 30) == b_np.integers(1 << 30)
    assert torch.equal(torch.randn(3, generator=a_torch), torch.randn(3, generator=b_torch))
    assert step_rngs(0, "dit", 8)[0].integers(1 << 30) != step_rngs(0, "dit", 7)[0].integers(1 << 30)


def test_resume_continues_exactly(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    # VAE: 1 step, then resume to 2 == 2 steps at once (model and optimizer state).
    train.train_vae(run_dir, dataclasses.replace(VAE, steps=1))
    with pytest.raises(KineFlowError, match="--resume"):
        train.train_vae(run_dir, VAE)
    with pytest.raises(KineFlowError, match="lr"):
        train.train_vae(run_dir, dataclasses.replace(VAE, lr=1e-2), resume=True)
    train.train_vae(run_dir, VAE, resume=True)
    whole, resumed = load_checkpoint(trained_run / "vae" / "ckpt.pt"), load_checkpoint(run_dir / "vae" / "ckpt.pt")
    assert resumed["step"] == 2
    assert _states_equal(whole["model"], resumed["model"])
    assert whole["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    assert all(torch.equal(whole["optimizer"]["state"][k]["exp_avg"], resumed["optimizer"]["state"][k]["exp_avg"])
               for k in whole["optimizer"]["state"])
    (whole_vae, whole_meta), (resumed_vae, resumed_meta) = (train.load_trained_vae(d) for d in (trained_run, run_dir))
    assert whole_meta == resumed_meta and _states_equal(whole_vae.state_dict(), resumed_vae.state_dict())

    # DiT: an exhausted budget stops before any step; then 2 steps, then resume to 4.
    stopped = train.train_dit(run_dir, DIT, budget=Budget(minutes=1e-9))
    assert (stopped.finished, stopped.step) == (False, 0)
    train.train_dit(run_dir, dataclasses.replace(DIT, steps=2), resume=True)
    result = train.train_dit(run_dir, DIT, resume=True)
    assert (result.finished, result.steps_run) == (True, 2)
    whole, resumed = load_checkpoint(trained_run / "dit" / "ckpt.pt"), load_checkpoint(run_dir / "dit" / "ckpt.pt")
    assert _states_equal(whole["model"], resumed["model"])
    logged = [json.loads(line)["step"] for line in (run_dir / "dit" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_scene_targets_name_each_colours_role():
    from kineflow.shapes.dataset import ClipSpec, ShapeSpec

    spec = ClipSpec("blue", (ShapeSpec("circle", "red", 0.5, 0.5, 0.1, "left", 0.3, "grows"),
                             ShapeSpec("square", "white", 0.2, 0.2, 0.1)))
    roles, directions, scales = train.scene_targets(spec)
    colours = list(train.shapes.COLOURS)
    assert train.ROLES[roles[colours.index("blue")]] == "background"
    assert train.ROLES[roles[colours.index("red")]] == "circle" and train.ROLES[roles[colours.index("green")]] == "absent"
    assert list(train.shapes.DIRECTIONS)[directions[colours.index("red")]] == "left"
    assert train.shapes.SCALE_CHANGES[scales[colours.index("red")]] == "grows"
    assert directions[colours.index("white")] == list(train.shapes.DIRECTIONS).index("still")
    assert directions[colours.index("blue")] == -100 and scales[colours.index("green")] == -100


def test_text_stage_learns_to_parse_captions_and_the_transformer_reads_it(tmp_path):
    settings = train.TextSettings(steps=30, batch_size=16, clips=200, warmup=5, save_every=10, log_every=10)
    before, _ = train.prepare_text_encoders(tmp_path, settings.seed, torch.float16)
    assert train.train_text(tmp_path, settings).finished
    log = [json.loads(line) for line in (tmp_path / "text" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], log
    after, _ = train.prepare_text_encoders(tmp_path, settings.seed, torch.float16)
    raw, _ = train.prepare_text_encoders(tmp_path, settings.seed, torch.float16, trained_llama=False)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(raw.llama.state_dict()[weight], before.llama.state_dict()[weight])
    assert not torch.equal(after.llama.state_dict()[weight], before.llama.state_dict()[weight])


def test_patch_decoder_places_each_latent_voxels_pixels():
    """Phase 1's stand-in decoder: latent frame 0 is video frame 0, frame k covers frames 4k-3..4k."""
    vae = train.HunyuanVideoVAE(train.build_family(1).vae)
    head = train.PatchDecoder(vae)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.bias.copy_(torch.arange(head.proj.out_channels, dtype=torch.float32))
    out = head(torch.zeros(1, 16, 3, 2, 2))
    assert out.shape == (1, 3, 9, 16, 16)
    # bias index = ((channel * 4 + frame_in_chunk) * 8 + row) * 8 + column
    assert out[0, 0, 0, 0, 0] == 3 * 64  # latent frame 0 -> its last sub-frame
    assert out[0, 1, 1, 2, 5] == ((1 * 4 + 0) * 8 + 2) * 8 + 5
    assert out[0, 2, 8, 9, 15] == ((2 * 4 + 3) * 8 + 1) * 8 + 7


def test_mlp_patch_head_starts_as_the_linear_head_and_learns_a_nonlinear_part():
    vae = train.HunyuanVideoVAE(train.build_family(1).vae)
    torch.manual_seed(0)
    linear, mlp = train.PatchDecoder(vae), train.PatchDecoder(vae, hidden=32)
    mlp.proj.load_state_dict(linear.proj.state_dict())
    z = torch.randn(2, 16, 3, 2, 2)
    assert torch.equal(mlp(z), linear(z))
    mlp(z).square().mean().backward()
    assert mlp.mlp[2].weight.grad.abs().sum() > 0  # the zero-initialised output layer gets a gradient


def test_foreground_weights_mark_the_shape_not_the_background():
    video = torch.full((1, 3, 1, 8, 8), -0.8)
    video[:, 0, :, 2:4, 2:4] = 0.9
    weights = train.foreground_weights(video, 4.0)
    assert weights[0, 0, 0, 2, 2] == 5.0 and weights[0, 0, 0, 0, 0] == 1.0 and weights.sum() == 64 + 4 * 4


def test_vae_refine_trains_the_decoder_and_keeps_the_latents(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before, meta_before = train.load_trained_vae(run_dir)
    # other clips than the vae stage saw (seed 7): the latent statistics still belong to the unchanged encoder
    settings = train.RefineSettings(steps=2, batch_size=1, crop=16, clips=4, seed=7, save_every=1, log_every=1)
    assert train.refine_vae(run_dir, settings).finished
    after, meta_after = train.load_trained_vae(run_dir)
    assert train.encoder_digest(after) == train.encoder_digest(before) and meta_after == meta_before
    assert not torch.equal(after.decoder.conv_out.conv.weight, before.decoder.conv_out.conv.weight)
    # the transformer's cache is keyed by the encoder, so it stays valid: resuming 'dit' does not rebuild it
    cache = run_dir / "dit" / "cache.pt"
    stamp = cache.stat().st_mtime_ns
    train.train_dit(run_dir, dataclasses.replace(DIT, steps=DIT.steps + 1), resume=True)
    assert cache.stat().st_mtime_ns == stamp


def test_vae_refine_latent_noise_and_clip_size_reach_the_decoder_training(trained_run, tmp_path):
    settings = train.RefineSettings(steps=1, batch_size=1, crop=16, clips=4, seed=7, save_every=1, log_every=1)

    def refined(name: str, **changes) -> torch.Tensor:
        run_dir = tmp_path / name
        shutil.copytree(trained_run, run_dir)
        assert train.refine_vae(run_dir, dataclasses.replace(settings, **changes)).finished
        return train.load_trained_vae(run_dir)[0].decoder.conv_out.conv.weight

    plain = refined("plain")
    assert torch.equal(plain, refined("again"))  # deterministic, so a difference below is the option's
    assert not torch.equal(plain, refined("noisy", latent_noise=1.0))
    assert not torch.equal(plain, refined("larger", size=32))
    with pytest.raises(KineFlowError, match="--crop must be a multiple of 8 between 8 and 8"):
        refined("small", size=8)


def test_a_new_dataset_version_rebuilds_the_transformer_cache(trained_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    cache = run_dir / "dit" / "cache.pt"
    stamp = cache.stat().st_mtime_ns
    monkeypatch.setattr(train.shapes, "DATASET_VERSION", train.shapes.DATASET_VERSION + 1)
    train.train_dit(run_dir, dataclasses.replace(DIT, steps=DIT.steps + 1), resume=True)
    assert cache.stat().st_mtime_ns != stamp
    assert torch.load(cache, weights_only=True)["key"]["dataset"] == train.shapes.DATASET_VERSION


def _transformer_cache(trained_run, tmp_path, **changes) -> dict:
    """The `dit` cache of a copy of the trained run, built with DIT changed by `changes`."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    settings = dataclasses.replace(DIT, **changes)
    vae, _ = train.load_trained_vae(run_dir)
    return train.build_cache(run_dir, settings, vae, train.dit_text_and_family(run_dir, settings)[0])


def test_the_transformer_cache_holds_the_requested_share_of_two_shape_clips(trained_run, tmp_path):
    from kineflow.shapes.prompts import parse_prompt

    cache = _transformer_cache(trained_run, tmp_path, two_shape_prob=1.0)
    assert cache["key"]["two_shape_prob"] == 1.0
    assert [len(parse_prompt(c).objects) for c in cache["captions"]] == [2] * DIT.clips


def test_the_transformer_cache_is_encoded_at_the_requested_size(trained_run, tmp_path):
    cache = _transformer_cache(trained_run, tmp_path, size=32)
    assert cache["key"]["size"] == 32 and cache["latents"].shape[-2:] == (4, 4)  # 32 px / the VAE's 8
    with pytest.raises(KineFlowError, match="multiple of 16"):
        train.DiTSettings(size=40)


def test_export_loads_back_through_the_runtime_loaders(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "weights"
    paths = train.export(trained_run, out)
    sizes = sum(train._size_mb(p) for p in paths.values())
    assert sizes < train.SIZE_LIMIT_MB
    card = paths["card"].read_text()
    assert "KineFlow tiny" in card and "The transformer last trained on 9-frame clips of 64x64" in card
    assert [line for line in card.splitlines() if line.startswith("## ")] == CARD_SECTIONS

    monkeypatch.setattr(host._Standalone, "models_dir", host._Standalone.models_dir)
    host.configure(models_dir=out)
    model = load_video_model("kineflow_tiny_dit.safetensors")
    vae = load_video_vae("kineflow_tiny_vae.safetensors")
    encoder = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors")
    assert not model.guidance_embedded
    assert "guidance" not in model.net_kwargs(encoder.encode([""]), 6.0, 1)
    assert model.preview_factors[0] is not None and model.preview_factors[0].shape == (16, 3)

    # The shipped (fp16) encoders and VAE reproduce what the transformer was trained on.
    cache = torch.load(trained_run / "dit" / "cache.pt", weights_only=True)
    text = encoder.encode(cache["captions"][:2])
    length = cache["text_states"].shape[1]
    torch.testing.assert_close(text["text_states"][:, :length], cache["text_states"][:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text["text_states_2"], cache["text_states_2"][:2], rtol=1e-4, atol=1e-4)
    video = train.video_batch(ShapesVideoDataset(length=DIT.clips, seed=DIT.seed), [0])[0]
    torch.testing.assert_close(vae.vae.encode_latents(video), cache["latents"][:1], rtol=1e-4, atol=1e-4)
    assert cache["latents"][:VAE.clips].std().item() == pytest.approx(1.0, abs=1e-3)  # scaling_factor = 1/std
    assert json.loads(cli_inspect(paths["vae"]))["family"] == "hunyuan_video_vae"
    assert json.loads(cli_inspect(paths["dit"]))["family"] == "hunyuan_video_dit"

    velocity = model.net_fn(cache["latents"][:2], torch.tensor([500.0, 500.0]), **model.net_kwargs(text, 1.0, 2))
    assert velocity.shape == cache["latents"][:2].shape and torch.isfinite(velocity).all()


def test_export_quotes_eval_reports_in_the_model_card(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(host._Standalone, "models_dir", host._Standalone.models_dir)
    out = tmp_path / "weights"
    train.export(trained_run, out)
    stdout = io.StringIO()
    assert cli.main(["eval", "-n", "2", "--steps", "1", "--width", "64", "--models-dir", str(out), "--json"], stdout=stdout,
                    stderr=io.StringIO()) == 0
    report = tmp_path / "report.json"
    report.write_text(stdout.getvalue())
    measured = json.loads(stdout.getvalue())["accuracy"]
    assert train.main(["export", "--run-dir", str(trained_run), "--out", str(out), "--scores", str(report)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| kineflow_tiny_dit.safetensors | 64x64, 1 steps euler, cfg 1, shift 3 |"))
    assert row.split(" | ")[2:8] == ["2", *(f"{measured[c]:.0%}" if measured[c] is not None else "-"
                                           for c in ("colour", "shape", "direction", "scale_change", "background"))]
    report.write_text("[1, 2]")
    assert train.main(["export", "--run-dir", str(trained_run), "--out", str(out), "--scores", str(report)]) == 2


def cli_inspect(path) -> str:
    stdout = io.StringIO()
    assert cli.main(["inspect", str(path), "--json"], stdout=stdout, stderr=io.StringIO()) == 0
    return stdout.getvalue()


def test_cli_parses_every_stage_and_reports_a_missing_run(tmp_path, capsys):
    args = train.build_parser().parse_args(["all", "--vae-steps", "3", "--dit-batch-size", "2", "--dit-shift", "2.5"])
    assert train._settings(args, train.VAESettings, "vae_").steps == 3
    dit = train._settings(args, train.DiTSettings, "dit_")
    assert (dit.batch_size, dit.shift, dit.steps) == (2, 2.5, train.DiTSettings().steps)
    assert train.main(["export", "--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "w")]) == 2
    assert "run the 'dit' stage first" in capsys.readouterr().err


def test_decay_steps_lower_the_learning_rate_linearly_to_the_end(tmp_path):
    settings = dataclasses.replace(DIT, warmup=1, decay_steps=2)
    run_dir = tmp_path / "run"
    shutil.copytree(_fresh_vae_run(tmp_path), run_dir)
    assert train.train_dit(run_dir, settings).finished
    rates = [json.loads(line)["lr"] for line in (run_dir / "dit" / "log.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([settings.lr, settings.lr, settings.lr, settings.lr / 2])


def _fresh_vae_run(tmp_path):
    """The encoder alone trained by the `vae` stage (0 decoder and end-to-end steps), its decoder by `vae-refine`:
    the latents are final once the encoder is, so the transformer's cache can be built while the decoder trains."""
    run_dir = tmp_path / "vae_only"
    assert train.train_vae(run_dir, dataclasses.replace(VAE, decoder_steps=0, steps=0)).finished
    refine = train.RefineSettings(steps=1, batch_size=1, crop=16, clips=4, save_every=1, log_every=1)
    assert train.refine_vae(run_dir, refine).finished
    return run_dir


def test_export_of_a_run_whose_decoder_was_trained_by_refine(tmp_path, monkeypatch):
    """Also with one token per latent pixel (--patch-size 1): the loader reads the patch from the weights."""
    run_dir = _fresh_vae_run(tmp_path)
    assert not (run_dir / "vae_decoder" / "ckpt.pt").exists() and not (run_dir / "vae" / "ckpt.pt").exists()
    assert train.train_dit(run_dir, dataclasses.replace(DIT, patch_size=1)).finished
    paths = train.export(run_dir, tmp_path / "weights")
    card = paths["card"].read_text()
    assert "vae_encoder 1 steps" in card and "vae_refine 1 steps" in card
    monkeypatch.setattr(host._Standalone, "models_dir", host._Standalone.models_dir)
    host.configure(models_dir=tmp_path / "weights")
    assert load_video_model("kineflow_tiny_dit.safetensors").net.config.patch_size == (1, 1, 1)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(_fresh_vae_run(tmp_path), run_dir)
    train.train_dit(run_dir, dataclasses.replace(DIT, steps=2))
    path = train.dit_checkpoint_path(run_dir)
    ckpt = torch.load(path, weights_only=False)
    del ckpt["settings"]["patch_size"]  # as written before --patch-size existed
    torch.save(ckpt, path)
    assert train.train_dit(run_dir, DIT, resume=True).finished
    with pytest.raises(KineFlowError, match="patch_size"):
        train.train_dit(run_dir, dataclasses.replace(DIT, steps=6, patch_size=1), resume=True)


def test_a_fine_tune_starts_from_an_exported_model_and_its_card_keeps_the_base_record(trained_run, tmp_path):
    base_run, base = tmp_path / "base_run", tmp_path / "base"
    shutil.copytree(trained_run, base_run)
    refine = train.RefineSettings(steps=1, batch_size=1, crop=16, clips=4, seed=7, save_every=1, log_every=1)
    assert train.refine_vae(base_run, refine).finished  # a base whose decoder was refined
    train.export(base_run, base)
    (base / "MODEL_CARD.md").write_text("...\nCommands of this run (time, command):\n\n"
                                        "    (base run) (base run) python -m oldest-run\n    python -m base-run\n")
    run_dir = tmp_path / "fine"
    frozen = dataclasses.replace(DIT, init_from=str(base), lr=0.0, steps=2)  # lr 0: the weights stay the base's
    assert train.train_dit(run_dir, frozen).finished

    # The fine-tune trains on the base's latents and conditioning, and its base's statistics are kept.
    ours, theirs = (torch.load(r / "dit" / "cache.pt", weights_only=True) for r in (run_dir, trained_run))
    for key in ("latents", "text_states", "text_states_2"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-3, atol=1e-3)
    base_vae, run_vae = train.load_trained_vae(trained_run)[1], train.load_trained_vae(run_dir)[1]
    for key in ("scaling_factor", "kineflow.latent_rgb_factors"):
        assert run_vae[key] == base_vae[key]
    assert float(run_vae["kineflow.latent_mean"]) == pytest.approx(float(base_vae["kineflow.latent_mean"]), abs=1e-3)

    # the decoder refined again in the fine-tune run continues the base's: the record counts the steps of both
    assert train.refine_vae(run_dir, refine).finished
    paths = train.export(run_dir, tmp_path / "weights")
    from safetensors.torch import load_file

    exported, started = load_file(str(paths["dit"])), load_file(str(base / "diffusion_models" / paths["dit"].name))
    assert exported.keys() == started.keys() and all(torch.equal(exported[k], started[k]) for k in exported)
    card = paths["card"].read_text()
    assert f"fine-tuned from the base's {DIT.steps}-step transformer" in card
    assert "(base run) python -m base-run" in card and "vae_encoder 1 steps" in card
    assert "    (base run) python -m oldest-run" in card  # one marker for all earlier runs, not one per generation
    record = json.loads(read_header(paths["dit"]).metadata["kineflow.training"])
    assert record["vae_steps"]["vae_refine"] == 2

    with pytest.raises(KineFlowError, match="already has its own VAE"):
        train.train_dit(trained_run, dataclasses.replace(frozen, steps=DIT.steps + 1), resume=True)
    with pytest.raises(KineFlowError, match="patch-size 2, this run asks for 1"):
        train.train_dit(tmp_path / "other", dataclasses.replace(frozen, patch_size=1))
    with pytest.raises(KineFlowError, match="expected an exported tiny model"):
        train.train_dit(tmp_path / "third", dataclasses.replace(frozen, init_from=str(tmp_path / "missing")))


def test_a_fine_tune_can_add_blocks_that_start_as_the_identity(trained_run, tmp_path, monkeypatch):
    base = tmp_path / "base"
    train.export(trained_run, base)
    grown = dataclasses.replace(DIT, init_from=str(base), lr=0.0, steps=2, double_blocks=3, single_blocks=4)
    assert train.train_dit(tmp_path / "grown", grown).finished
    paths = train.export(tmp_path / "grown", tmp_path / "weights")

    monkeypatch.setattr(host._Standalone, "models_dir", host._Standalone.models_dir)
    models = {}
    for folder in (base, tmp_path / "weights"):
        host.configure(models_dir=folder)
        models[folder] = load_video_model(paths["dit"].name)
    before, after = models.values()
    assert (len(after.net.double_blocks), len(after.net.single_blocks)) == (3, 4)  # the loader reads the depth
    cache = torch.load(trained_run / "dit" / "cache.pt", weights_only=True)
    cond = {"text_states": cache["text_states"][:2], "text_mask": cache["text_mask"][:2],
            "text_states_2": cache["text_states_2"][:2]}
    x, t = cache["latents"][:2], torch.tensor([700.0, 300.0])
    torch.testing.assert_close(after.net_fn(x, t, **after.net_kwargs(cond, 1.0, 2)),
                               before.net_fn(x, t, **before.net_kwargs(cond, 1.0, 2)))
    # the new blocks are copies of the last ones with their gates closed, not zeros
    new_block = after.net.double_blocks[2]
    assert new_block.img_attn_qkv.weight.abs().sum() > 0
    assert new_block.img_mod.linear.weight.unflatten(0, (6, -1))[[2, 5]].abs().sum() == 0

    with pytest.raises(KineFlowError, match="has 3 double-blocks, this run asks for 2"):
        train.train_dit(tmp_path / "fewer", dataclasses.replace(DIT, init_from=str(tmp_path / "weights"), steps=2))


def test_saved_weights_are_byte_identical_across_processes(tmp_path):
    """safetensors writes metadata in a random order per process; exports sort it so unchanged weights leave
    git nothing to see."""
    import subprocess
    import sys

    keys = ["scaling_factor", "norm_num_groups", "kineflow.training", "b", "é", "z"]
    script = ("import sys, torch; from pathlib import Path; from kineflow.training.tiny_models import "
              "save_safetensors; save_safetensors({'w': torch.arange(6.0)}, Path(sys.argv[1]), "
              f"{{k: i for i, k in enumerate({keys!r})}})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    assert read_header(paths[0]).metadata == {"scaling_factor": "0", "norm_num_groups": "1", "kineflow.training": "2",
                                              "b": "3", "é": "4", "z": "5"}


ADAPT = train.AdaptSettings(steps=2, warmup=1, decay_steps=0, batch_size=1, crop=4, pairs=2, size=64, sample_steps=2,
                            save_every=1, log_every=1)


def test_vae_adapt_teaches_the_decoder_the_transformers_latents_and_keeps_the_encoder(trained_run, tmp_path):
    """`vae-adapt` regenerates training clips with an exported model's transformer (each clip's latent re-noised,
    then sampled back under its caption) and trains the decoder on those latents and the real ones: the decoder
    changes, the encoder and its latent statistics do not, the export's card records the stage; the pairs are
    cached and a larger --pairs extends them; a generator with another VAE encoder, or none, is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    generator = train.export(run_dir, tmp_path / "generator")["card"].parent
    before, meta_before = train.load_trained_vae(run_dir)
    settings = dataclasses.replace(ADAPT, generator=str(generator))
    assert train.adapt_vae(run_dir, settings).finished
    after, meta_after = train.load_trained_vae(run_dir)
    assert train.encoder_digest(after) == train.encoder_digest(before) and meta_after == meta_before
    assert not torch.equal(after.decoder.conv_out.conv.weight, before.decoder.conv_out.conv.weight)
    assert "vae_adapt 2 steps" in train.export(run_dir, tmp_path / "weights")["card"].read_text()

    first = torch.load(run_dir / "vae_adapt" / "pairs.pt", weights_only=True)["latents"]
    real = before.encode(train.video_batch(ShapesVideoDataset(length=2, seed=ADAPT.seed, height=64, width=64,
                                                              two_shape_prob=ADAPT.two_shape_prob), [0, 1])[0]).mean
    assert first.shape == real.shape and not torch.allclose(first.float(), real, atol=1e-2)  # regenerated
    more = train.adapt_pairs(run_dir, dataclasses.replace(settings, pairs=3), before)
    assert len(more) == 3 and torch.equal(more[:2], first)

    other = train.VAESettings(**{**dataclasses.asdict(VAE), "seed": 5})
    train.train_vae(tmp_path / "other", other)
    with pytest.raises(KineFlowError, match="VAE encoder differs"):
        train.adapt_pairs(tmp_path / "other", settings, train.load_trained_vae(tmp_path / "other")[0])
    with pytest.raises(KineFlowError, match="needs --generator"):
        train.adapt_vae(tmp_path / "none", dataclasses.replace(settings, generator=""))
