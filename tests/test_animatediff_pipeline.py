"""AnimateDiff family end to end on tiny random-weight files written in the real layouts.

The files (training/tiny_sd.py) go through the same loader nodes, detection and key conversion as released
checkpoints; the workflow is tests/data/workflows/animatediff_tiny_random_api.json (Load SD Checkpoint ->
Load Motion Module -> Apply Motion Module -> Text Encode -> Empty Video Latent (sd15) -> Sampler -> VAE Decode
-> Save Video).
"""

import json
from pathlib import Path
from types import SimpleNamespace

import av
import pytest
import torch

from kineflow.models import checkpoints
from kineflow.models.sd15_unet import SD15UNet
from kineflow.models.hunyuan_video_vae import TilingOptions
from kineflow.nodes.animatediff import KineFlowApplyMotionModule, KineFlowLoadMotionLoRA
from kineflow.runtime import animatediff as ad_runtime
from kineflow.runtime import cli, host
from kineflow.errors import KineFlowError
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.samplers.sampling import DiscreteV
from kineflow.training import tiny_sd

WORKFLOW = Path(__file__).parent / "data" / "workflows" / "animatediff_tiny_random_api.json"
FRAMES = 16


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_models")
    tiny_sd.write_models(root, seed=0)
    return root


@pytest.fixture(scope="module")
def cache():
    """Shared between the workflow runs of this module, so unchanged loaders run once."""
    return OutputCache()


@pytest.fixture(scope="module")
def parts(models_dir):
    host.configure(models_dir=models_dir)
    model, vae, text_encoder = ad_runtime.load_sd_checkpoint("kineflow_random_sd15.safetensors")
    motion = ad_runtime.load_motion_module("kineflow_random_mm_v2.safetensors")
    return model, vae, text_encoder, motion


def _workflow(**extra_nodes) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    prompt.update(extra_nodes)
    return prompt


def _run(models_dir, out_dir, cache, workflow=None, overrides=()):
    return run_workflow(workflow if workflow is not None else str(WORKFLOW), overrides=list(overrides),
                        models_dir=models_dir, output_dir=out_dir, cache=cache)


def _net_output(model, text_encoder, frames=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, frames, 8, 8, generator=gen)
    context = text_encoder.encode(["a red circle"])["context"]
    return model.net_fn(x, torch.tensor([500.0]), context)


# --------------------------------------------------------------------------- files and detection
def test_tiny_files_are_detected_like_released_ones(models_dir):
    found = {key: checkpoints.detect(checkpoints.read_header(models_dir / name))
             for key, name in tiny_sd.NAMES.items()}
    summary = {key: (d.family, d.layout, d.version) for key, d in found.items()}
    assert summary == {
        "checkpoint": ("sd15_checkpoint", "ldm", "sd15"),
        "unet": ("sd15_unet", "ldm", "sd15"),
        "vae": ("sd_vae", "ldm", None),
        "clip": ("clip_text", "hf", "hidden64"),
        "mm_v1": ("animatediff_motion_module", "original", "v1"),
        "mm_v2": ("animatediff_motion_module", "original", "v2"),
        "mm_v3": ("animatediff_motion_module", "original", "v3"),
        "motion_lora": ("animatediff_motion_lora", "original", None),
        "adapter": ("animatediff_domain_adapter", "diffusers", None),
    }
    assert "64-wide text context" in found["checkpoint"].note and "small UNet" in found["mm_v3"].note


# --------------------------------------------------------------------------- the workflow
def test_workflow_writes_an_mp4_with_the_requested_frames(models_dir, tmp_path, cache):
    results = _run(models_dir, tmp_path, cache)
    frames = results["7"]["outputs"][0]
    assert frames.shape == (FRAMES, 64, 64, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    assert frames.std(dim=0).mean() > 1e-3, "frames of a random model with a motion module should differ"
    (saved,) = results["8"]["ui"]["images"]
    with av.open(str(tmp_path / saved["filename"])) as container:
        stream = container.streams.video[0]
        assert (len(list(container.decode(stream))), stream.width, stream.height) == (FRAMES, 64, 64)


def test_samplers_and_schedulers(models_dir, tmp_path, cache):
    def latent(*overrides):
        return _run(models_dir, tmp_path, cache, overrides=overrides)["6"]["outputs"][0]["samples"]

    euler = latent()
    ddim = latent('6.sampler_name="ddim"')
    dpmpp = latent('6.sampler_name="dpmpp_2m"', '6.scheduler="karras"')
    guided = latent('4.negative_prompt="blurry"', "6.cfg=3.0")  # cond and uncond run as one batch of 2 videos
    assert euler.shape == (1, 4, FRAMES, 8, 8) and bool(torch.isfinite(dpmpp).all())
    # the same update for an x0-predicting denoiser (samplers/sampling.py), up to rounding
    assert torch.allclose(euler, ddim, atol=1e-4)
    assert (dpmpp - euler).abs().mean() > 1e-3 and (guided - euler).abs().mean() > 1e-3


def test_schedule_matches_diffusers_leading_spacing(parts):
    from diffusers import EulerDiscreteScheduler

    model = parts[0]
    reference = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                                       timestep_spacing="leading", steps_offset=1)
    reference.set_timesteps(10)
    assert torch.allclose(model.sigmas(10, 7.0, 1.0, "default"), reference.sigmas.float(), rtol=1e-4)
    karras = model.sigmas(10, 7.0, 1.0, "karras")
    assert torch.isclose(karras[0], reference.sigmas[0].float(), rtol=1e-4) and not torch.allclose(karras, reference.sigmas.float())
    with pytest.raises(KineFlowError, match="unknown scheduler 'beta'"):
        model.sigmas(10, 1.0, 1.0, "beta")


def test_context_windows_bound_the_frames_the_unet_sees(models_dir, tmp_path, cache, monkeypatch):
    seen = []
    forward = SD15UNet.forward

    def recording_forward(self, x, timesteps, context, video_frames=None, temporal=None, **kwargs):
        seen.append((x.shape[0], video_frames))
        return forward(self, x, timesteps, context, video_frames, temporal, **kwargs)

    monkeypatch.setattr(SD15UNet, "forward", recording_forward)
    workflow = _workflow(**{"9": {"class_type": "KineFlowContextOptions", "inputs": {
        "length": 8, "overlap": 2, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}})
    workflow["5"]["inputs"]["frames"] = 20
    workflow["6"]["inputs"]["steps"] = 2
    plain = _run(models_dir, tmp_path, cache, workflow)["7"]["outputs"][0]
    assert seen == [(20, 20)] * 2  # without windows: the whole video in one UNet call per step
    seen.clear()
    workflow["6"]["inputs"]["context_options"] = ["9", 0]
    windowed = _run(models_dir, tmp_path, cache, workflow)["7"]["outputs"][0]
    assert seen == [(8, 8)] * (2 * 3)  # 2 steps x 3 windows of 8 frames (20 frames, overlap >= 2)
    assert windowed.shape == plain.shape == (20, 64, 64, 3)
    assert not torch.equal(windowed, plain)


@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_motion_module_for_another_unet_width_is_a_clear_error(models_dir, tmp_path, capsys, version):
    name = f"wide_mm_{version}.safetensors"
    tiny_sd.write_motion_module(models_dir / "animatediff_models" / name, version, block_channels=(64, 128))
    code = cli.main(["run", str(WORKFLOW), "--models-dir", str(models_dir), "--output-dir", str(tmp_path),
                     "--set", f'2.model_name="{name}"'])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err  # a model file that cannot serve here: an unusable input file
    assert "does not fit this UNet" in err and "channels [64, 128]" in err and "channels [32, 64]" in err


def test_wrong_file_in_motion_module_loader_says_what_it_is(models_dir, tmp_path, capsys):
    (models_dir / "animatediff_models" / "oops.safetensors").write_bytes(
        (models_dir / tiny_sd.NAMES["motion_lora"]).read_bytes())
    code = cli.main(["run", str(WORKFLOW), "--models-dir", str(models_dir), "--output-dir", str(tmp_path),
                     "--set", '2.model_name="oops.safetensors"'])
    err = capsys.readouterr().err
    assert code == 2 and "animatediff_motion_lora" in err and "expects a AnimateDiff motion module" in err


# --------------------------------------------------------------------------- handles, LoRAs, adapter
def test_apply_motion_module_returns_a_new_handle(parts):
    model, _vae, text_encoder, motion = parts
    per_frame = _net_output(model, text_encoder)
    animated = KineFlowApplyMotionModule().apply(model, motion, 1.0)[0]
    still = KineFlowApplyMotionModule().apply(model, motion, 0.0)[0]
    assert model.motion is None and animated is not model
    assert animated.unet is model.unet  # the UNet's weights are shared, not copied
    assert torch.equal(_net_output(model, text_encoder), per_frame)
    assert torch.equal(_net_output(still, text_encoder), per_frame)
    assert (_net_output(animated, text_encoder) - per_frame).abs().max() > 1e-4
    assert motion.module.scale == 1.0 and animated.motion.scale == 1.0 and still.motion.scale == 0.0
    with pytest.raises(KineFlowError, match="motion modules apply to SD1.5 models .* got a hunyuan_video model"):
        ad_runtime.apply_motion_module(SimpleNamespace(family="hunyuan_video"), motion)


def test_motion_lora_chain(parts):
    model, _vae, text_encoder, motion = parts
    node = KineFlowLoadMotionLoRA()
    lora = "kineflow_random_motion_lora.safetensors"
    weights = {k: v.clone() for k, v in motion.module.state_dict().items()}
    base = _net_output(ad_runtime.apply_motion_module(model, motion), text_encoder)

    zero = node.apply(node.apply(motion, lora, 0.0)[0], lora, 0.0)[0]
    assert torch.equal(_net_output(ad_runtime.apply_motion_module(model, zero), text_encoder), base)

    once = node.apply(motion, lora, 0.5)[0]
    twice = node.apply(once, lora, 0.5)[0]
    full = node.apply(motion, lora, 1.0)[0]
    assert [s for _, s in twice.loras] == [0.5, 0.5] and once.loras == twice.loras[:1]
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"
    assert torch.allclose(twice.module.state_dict()[key], full.module.state_dict()[key], atol=1e-6)
    assert not torch.equal(once.module.state_dict()[key], weights[key])
    assert (_net_output(ad_runtime.apply_motion_module(model, full), text_encoder) - base).abs().max() > 1e-4
    for k, v in motion.module.state_dict().items():  # the input module is never merged into
        assert torch.equal(v, weights[k]), k


def test_domain_adapter_merges_into_a_copy(parts, models_dir):
    model, _vae, text_encoder, _motion = parts
    before = _net_output(model, text_encoder)
    assert ad_runtime.apply_domain_adapter(model, "kineflow_random_v3_adapter.safetensors", 0.0) is model
    adapted = ad_runtime.apply_domain_adapter(model, "kineflow_random_v3_adapter.safetensors", 1.0)
    assert adapted.unet is not model.unet
    assert (_net_output(adapted, text_encoder) - before).abs().max() > 1e-4
    assert torch.equal(_net_output(model, text_encoder), before)
    (models_dir / "loras" / "not_an_adapter.safetensors").write_bytes((models_dir / tiny_sd.NAMES["mm_v3"]).read_bytes())
    with pytest.raises(KineFlowError, match="animatediff_motion_module.*expects a AnimateDiff v3 domain adapter"):
        ad_runtime.apply_domain_adapter(model, "not_an_adapter.safetensors", 1.0)


def test_separate_files_give_the_same_model_as_the_checkpoint(parts):
    model, vae, text_encoder, _motion = parts
    model2, vae2, text_encoder2 = ad_runtime.load_sd_components(
        "kineflow_random_sd15_unet.safetensors", "kineflow_random_sd_vae.safetensors", "kineflow_random_sd_clip.safetensors")
    assert torch.equal(text_encoder2.encode(["a cat"])["context"], text_encoder.encode(["a cat"])["context"])
    assert torch.equal(_net_output(model2, text_encoder2), _net_output(model, text_encoder))
    latents = torch.randn(1, 4, 3, 8, 8)
    assert torch.equal(vae2.decode(latents, "auto", 1 << 30, lambda *_: None), vae.decode(latents, "auto", 1 << 30, lambda *_: None))


def test_text_encoder_follows_the_sd15_convention(parts):
    text_encoder = parts[2]
    out = text_encoder.encode(["a red circle", "a much longer prompt about a blue square"])
    assert out["context"].shape == (2, 77, 64) and out["pooled"].shape == (2, 64)
    ids, _ = text_encoder.tokenizer.encode(["a red circle"], 77)
    eos = int(ids[0].argmax())  # the first end-of-text token: pooling reads the state there
    assert torch.equal(out["pooled"][0], out["context"][0, eos])


def test_conditioning_from_another_family_is_a_clear_error(parts):
    model = parts[0]
    with pytest.raises(KineFlowError, match="not the CLIP token states"):
        model.net_kwargs({"text_states": torch.zeros(1, 4, 8), "text_mask": torch.ones(1, 4)}, 6.0, 1)
    with pytest.raises(KineFlowError, match=r"this UNet expects \[B, tokens, 64\]"):
        model.net_kwargs({"context": torch.zeros(1, 77, 768)}, 6.0, 1)


def test_v_prediction_option(models_dir):
    host.configure(models_dir=models_dir)
    model, _, _ = ad_runtime.load_sd_checkpoint("kineflow_random_sd15.safetensors", prediction="v")
    assert isinstance(model.model_sampling, DiscreteV) and model.prediction == "v"
    with pytest.raises(KineFlowError, match="prediction must be one of eps, v"):
        ad_runtime.load_sd_checkpoint("kineflow_random_sd15.safetensors", prediction="x0")


def test_vae_frame_batches_do_not_change_the_result(parts):
    vae = parts[1]
    latents = torch.randn(2, 4, 5, 4, 4)
    progress = []
    whole = vae.decode(latents, None, 1 << 40, lambda done, total: progress.append((done, total)))
    assert progress == [(5, 5)]
    progress.clear()
    one_frame = vae.frame_bytes(32, 32)
    batched = vae.decode(latents, "auto", 2 * 2 * one_frame, lambda done, total: progress.append((done, total)))
    assert progress == [(2, 5), (4, 5), (5, 5)]
    assert whole.shape == (2, 3, 5, 32, 32) and torch.allclose(batched, whole, atol=1e-5)
    explicit = vae.encode(whole, TilingOptions(tile_size=32, tile_frames=4), 0, lambda *_: None)
    assert torch.allclose(explicit, vae.encode(whole, None, 1 << 40, lambda *_: None), atol=1e-5)
    with pytest.raises(KineFlowError, match="cannot tile within one: frames are 32x32, tile_size is 16"):
        vae.decode(latents, TilingOptions(tile_size=16), 0, lambda *_: None)
