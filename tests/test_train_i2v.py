"""The `i2v` training stage: the image-to-video transformer grown from a text-to-video one (starting as exactly
it), a few steps on a tiny random model set, the file it exports (detected as HunyuanVideo-I2V's 33-channel
layout, loaded by Load Video Model, sampled through Image To Video), resumption, and its refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kineflow.errors import KineFlowError
from kineflow.models import hunyuan_video_dit as dit_mod
from kineflow.runtime import generation
from kineflow.runtime.video_models import load_text_encoders, load_video_model, load_video_vae
from kineflow.shapes.dataset import clip_tensor
from kineflow.shapes.prompts import heldout_prompts
from kineflow.shapes.shipped import HUNYUAN_VIDEO as SHIPPED_NAMES
from kineflow.training import train, train_i2v
from kineflow.training.common import load_checkpoint
from kineflow.training.fine_tune import load_base_state
from kineflow.training.tiny_models import write_models

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = train.I2VSettings(steps=3, batch_size=4, lr=1e-2, warmup=1, decay_steps=0, clips=6, size=32,
                             save_every=1, log_every=1, dtype="fp32")


@pytest.fixture(scope="module")
def base_models(tmp_path_factory):
    """A random tiny model set under the shipped file names (as `export` writes), without guidance embedding."""
    folder = tmp_path_factory.mktemp("base")
    paths = write_models(folder, train.caption_vocabulary(), names=SHIPPED_NAMES)
    state = {k: v for k, v in load_file(str(paths["dit"])).items() if not k.startswith("guidance_in.")}
    save_file(state, str(paths["dit"]), metadata={"kineflow.training": json.dumps({"dit": {"steps": 1}}),
                                                  "kineflow.teacache_coefficients": "[1, 0]"})
    return folder


def _settings(base, **changes) -> train.I2VSettings:
    return dataclasses.replace(SETTINGS, base=str(base), **changes)


def _inputs(channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 3, 4, 4, generator=g)
    text = torch.randn(2, 5, 128, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    return x, torch.tensor([500.0, 900.0]), text, mask, torch.randn(2, 64, generator=g)


def test_grown_model_starts_as_the_text_to_video_model(base_models):
    base = load_base_state(base_models / "diffusion_models" / SHIPPED_NAMES["dit"])
    t2v = dit_mod.HunyuanVideoDiT(dit_mod.config_from_state_dict(base))
    t2v.load_state_dict(base)
    config, state = train_i2v.image_to_video_state(base)
    assert config.variant == "i2v-33ch" and config.image_mask_channel
    i2v = dit_mod.HunyuanVideoDiT(config)
    i2v.load_state_dict(state)
    x, t, text, mask, pooled = _inputs(config.out_channels)
    image = dit_mod.image_condition_channels(config, torch.randn(2, config.out_channels, 1, 4, 4), frames=3)
    with torch.no_grad():
        want = t2v(x, t, text, mask, pooled)
        got = i2v(x, t, text, mask, pooled, image_latent=image)
    assert (got - want).abs().max() < 1e-6  # the image's channels enter through zero weights
    with pytest.raises(ValueError, match="already an image-to-video model"):
        train_i2v.image_to_video_state(state)


def test_i2v_trains_and_exports_a_33_channel_model_image_to_video_samples(base_models, tmp_path):
    base_dit = base_models / "diffusion_models" / SHIPPED_NAMES["dit"]
    result = train_i2v.train_i2v(tmp_path, _settings(base_models))
    assert result.finished and result.step == 3
    path = tmp_path / "i2v" / train_i2v.I2V_FILE
    tensors = load_file(str(path))
    weight = tensors["img_in.proj.weight"]
    assert weight.shape[1] == 33 and weight[:, 16:].abs().max() > 0  # training opened the image channels
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta["kineflow.i2v"])
    assert record["base_model"] == SHIPPED_NAMES["dit"] and record["steps"] == 3 and record["variant"] == "i2v-33ch"
    assert "kineflow.training" in meta and "kineflow.teacache_coefficients" not in meta  # fitted to the base only

    handle = load_video_model(str(path), weight_dtype="fp32")
    assert handle.net.config.variant == "i2v-33ch"
    vae = load_video_vae(str(base_models / "vae" / SHIPPED_NAMES["vae"]), "fp32")
    text = load_text_encoders(str(base_models / "text_encoders" / SHIPPED_NAMES["llm"]),
                              str(base_models / "text_encoders" / SHIPPED_NAMES["clip"]), dtype_name="fp32")
    prompt, spec = heldout_prompts(1, height=32, width=32)[0]
    cond, latent = generation.image_to_video(generation.encode_prompts(text, prompt), vae, clip_tensor(spec)[:1],
                                             32, 32, 5, 1, "auto")
    out = generation.sample_video(handle, cond, latent, seed=0, steps=2, cfg=1.0, shift=3.0, embedded_guidance=1.0,
                                  sampler_name="euler")
    assert out["samples"].shape == (1, 16, 2, 4, 4) and torch.isfinite(out["samples"]).all()
    # The base file is read, never written.
    assert load_file(str(base_dit)).keys() == load_base_state(base_dit).keys()


def test_resumed_i2v_run_equals_an_uninterrupted_one(base_models, tmp_path):
    assert train_i2v.train_i2v(tmp_path / "a", _settings(base_models, steps=4)).finished
    assert train_i2v.train_i2v(tmp_path / "b", _settings(base_models, steps=2)).finished
    with pytest.raises(KineFlowError, match="clips"):
        train_i2v.train_i2v(tmp_path / "b", _settings(base_models, steps=4, clips=7), resume=True)
    resumed = train_i2v.train_i2v(tmp_path / "b", _settings(base_models, steps=4), resume=True)
    assert resumed.finished and resumed.steps_run == 2
    a, b = (load_checkpoint(tmp_path / run / "i2v" / "ckpt.pt")["model"] for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2v_settings_refuse_bad_values():
    with pytest.raises(KineFlowError, match="--size"):
        train.I2VSettings(size=40)
    with pytest.raises(KineFlowError, match="--clips"):
        train.I2VSettings(clips=0)
