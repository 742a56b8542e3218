"""SparseCtrl (AnimateDiff v3 sparse controls): the released layout, detection, parity with diffusers'
SparseControlNetModel through the loader (both file layouts, rgb and scribble), the UNet's control residuals, strength
and range, context windows, the meta device, clear errors, and the nodes end to end on the shipped tiny model."""

import json
import re
import shutil

import pytest
import torch
from torch import nn

from checkpoint_fixtures import manifest_shapes
from device_check import one_device
from kineflow import NODE_CLASS_MAPPINGS
from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models import checkpoints
from kineflow.models import sd15_unet as su
from kineflow.models import sparsectrl as sc
from kineflow.nodes.sparsectrl import KineFlowApplySparseCtrl, KineFlowLoadSparseCtrl, parse_frame_indices
from kineflow.runtime import animatediff as ad_runtime
from kineflow.runtime import host
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.samplers.context import ContextOptions, context_window_denoiser

RGB_MANIFEST = "animatediff_v3_sd15_sparsectrl_rgb"
TINY_CHECKPOINT = "kineflow_tiny_sd15.safetensors"
TINY_MOTION = "kineflow_tiny_mm.safetensors"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers
def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _randomise(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Released files are trained: zero-initialised output convs would make every residual zero."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=gen) * scale


def original_layout(sd: dict, config: sc.SparseCtrlConfig) -> dict:
    """Internal names -> guoyww's original ones (the inverse of convert_state_dict for this config). Checked against
    the real layout by test_original_layout_helper_gives_the_released_names."""
    levels, per = len(config.channel_mult), config.num_res_blocks
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block.0": "mid_block.resnets.0",
             "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1"}
    for level in range(levels):
        for j in range(per):
            block = 1 + level * (per + 1) + j
            names[f"input_blocks.{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        names[f"input_blocks.{1 + level * (per + 1) + per}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    resnet = {ldm: diffusers for diffusers, ldm in su._DIFFUSERS_RESNET.items()}
    out = {}
    for key, value in sd.items():
        if key.startswith(("down_blocks.", "controlnet_")):
            out[key] = value
            continue
        ldm = max((n for n in names if key.startswith(n + ".")), key=len)
        rest = key[len(ldm) + 1:]
        if ".resnets." in names[ldm]:
            layer, param = rest.rsplit(".", 1)
            rest = f"{resnet[layer]}.{param}"
        out[f"{names[ldm]}.{rest}"] = value
    return out


def diffusers_to_original(sd: dict) -> dict:
    """diffusers' SparseControlNetModel names -> guoyww's: the inverse of the renames in diffusers'
    scripts/convert_animatediff_sparsectrl_to_diffusers.py (motion modules only; the rest is shared)."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"(.*?motion_modules\.\d+)\.(.*)$", key)
        if m:
            rest = m.group(2).replace(".pos_embed.", ".attention_blocks.0.pos_encoder.")
            rest = rest.replace(".attn1.", ".attention_blocks.0.").replace(".norm1.", ".norms.0.")
            key = f"{m.group(1)}.temporal_transformer.{rest.replace('.norm3.', '.ff_norm.')}"
        out[key] = value
    return out


class _PerFrameGroupNorm(nn.GroupNorm):
    """diffusers' AnimateDiffTransformer3D normalises [B, C, F, H, W] across frames; guoyww's code (which trained the
    released files) and KineFlow per frame."""

    def forward(self, x):
        b, c, f, h, w = x.shape
        return super().forward(x.transpose(1, 2).reshape(b * f, c, h, w)).reshape(b, f, c, h, w).transpose(1, 2)


def _diffusers_sparsectrl(kind: str, seed: int = 1):
    from diffusers import SparseControlNetModel

    torch.manual_seed(0)
    model = SparseControlNetModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        cross_attention_dim=32, attention_head_dim=8, motion_num_attention_heads=8, norm_num_groups=32,
        motion_max_seq_length=32, conditioning_channels=4 if kind == "rgb" else 3,
        use_simplified_condition_embedding=kind == "rgb", conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    _randomise(model, seed)
    for layer in model.modules():
        if type(layer).__name__ == "AnimateDiffTransformer3D":
            norm = _PerFrameGroupNorm(layer.norm.num_groups, layer.norm.num_channels, layer.norm.eps)
            norm.load_state_dict(layer.norm.state_dict())
            layer.norm = norm
    return model


def _condition(kind: str, batch: int, frames: int, size: int, keyframes: list[int], seed: int = 2):
    """A diffusers-style condition [B, C, F, H', W'] and mask, zero except at `keyframes`."""
    gen = torch.Generator().manual_seed(seed)
    channels, side = (4, size) if kind == "rgb" else (3, size * 8)
    condition = torch.zeros(batch, channels, frames, side, side)
    mask = torch.zeros(batch, 1, frames, side, side)
    condition[:, :, keyframes] = torch.rand(batch, channels, len(keyframes), side, side, generator=gen)
    mask[:, :, keyframes] = 1.0
    return condition, mask


def _frames_first(video: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W] (video b's frame f at b*F + f)."""
    return video.transpose(1, 2).flatten(0, 1)


def _models_dir(tmp_path):
    (tmp_path / "controlnet").mkdir(exist_ok=True)
    return tmp_path


def _save(sd: dict, path):
    if path.suffix == ".ckpt":
        torch.save({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# --------------------------------------------------------------------------- the released layout and detection
def test_full_size_model_has_the_released_rgb_layout():
    shapes = manifest_shapes(RGB_MANIFEST)
    det = checkpoints.detect(shapes)
    assert (det.family, det.layout, det.version, det.note) == ("sparsectrl", "original", "rgb", "")
    converted = sc.convert_state_dict(shapes, "original")
    assert sc.config_from_state_dict(converted) == sc.SparseCtrlConfig.full("rgb")
    with torch.device("meta"):
        model = sc.SparseCtrl(sc.SparseCtrlConfig.full("rgb"))
    assert _shapes(model.state_dict()) == _shapes({k: torch.empty(v, device="meta") for k, v in converted.items()})
    assert model.state_dict()["controlnet_cond_embedding.weight"].shape == (320, 5, 3, 3)  # latent + frame mask
    assert len(model.controlnet_down_blocks) == 12 and len(model.offload_blocks()) == 12 + 8 + 1


def test_original_layout_helper_gives_the_released_names():
    with torch.device("meta"):
        model = sc.SparseCtrl(sc.SparseCtrlConfig.full("rgb"))
    assert _shapes(original_layout(model.state_dict(), model.config)) == manifest_shapes(RGB_MANIFEST)


def test_detection_of_layouts_kinds_and_other_files():
    rgb = manifest_shapes(RGB_MANIFEST)
    scribble = {k: v for k, v in rgb.items() if not k.startswith("controlnet_cond_embedding.")}
    widths = (16, 32, 96, 256)
    scribble["controlnet_cond_embedding.conv_in.weight"] = (16, 4, 3, 3)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        scribble[f"controlnet_cond_embedding.blocks.{2 * i}.weight"] = (a, a, 3, 3)
        scribble[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"] = (b, a, 3, 3)
    scribble["controlnet_cond_embedding.conv_out.weight"] = (320, 256, 3, 3)
    det = checkpoints.detect(scribble)
    assert (det.family, det.layout, det.version) == ("sparsectrl", "original", "scribble")
    assert sc.config_from_state_dict(sc.convert_state_dict(scribble, "original")) == sc.SparseCtrlConfig.full("scribble")

    diffusers_rgb = {k.replace("temporal_transformer.", "").replace("attention_blocks.0.pos_encoder", "pos_embed")
                     .replace("attention_blocks.0.", "attn1.").replace("norms.0.", "norm1.").replace("ff_norm.", "norm3."): v
                     for k, v in rgb.items()}
    det = checkpoints.detect(diffusers_rgb)
    assert (det.family, det.layout, det.version) == ("sparsectrl", "diffusers", "rgb")
    assert checkpoints.detect({f"controlnet.{k}": v for k, v in rgb.items()}).prefix == "controlnet."

    no_mask = dict(rgb, **{"controlnet_cond_embedding.weight": (320, 4, 3, 3)})
    assert "without the frame-mask channel" in checkpoints.detect(no_mask).note
    odd = dict(rgb, **{"controlnet_cond_embedding.weight": (320, 7, 3, 3)})
    assert checkpoints.detect(odd).family is None and "takes 7 channels" in checkpoints.detect(odd).note
    image_controlnet = {k: v for k, v in rgb.items() if ".motion_modules." not in k}
    det = checkpoints.detect(image_controlnet)
    assert det.family is None and "image ControlNet, not AnimateDiff's SparseCtrl" in det.note
    ldm_controlnet = {"control_model.zero_convs.0.0.weight": (320, 320, 1, 1), "control_model.input_hint_block.0.weight":
                      (16, 3, 3, 3), "control_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                      "control_model.time_embed.0.weight": (1280, 320)}
    assert "LDM layout" in checkpoints.detect(ldm_controlnet).note
    # the motion modules are unchanged by the new branch
    assert checkpoints.detect(manifest_shapes("animatediff_v3_sd15_mm")).family == "animatediff_motion_module"


def test_frame_indices_are_parsed_with_clear_errors():
    assert parse_frame_indices("0") == (0,) and parse_frame_indices(" 0, 8 ,15") == (0, 8, 15)
    assert parse_frame_indices("0,-1") == (0, -1)
    for text, message in (("", "empty"), ("0,a", "'a', not a whole number"), ("1,1", "names a frame twice")):
        with pytest.raises(ValueError, match=message):
            parse_frame_indices(text)
    assert "not a whole number" in KineFlowApplySparseCtrl.VALIDATE_INPUTS(frame_indices="0, x")
    assert "after end_percent" in KineFlowApplySparseCtrl.VALIDATE_INPUTS(start_percent=0.8, end_percent=0.2)
    assert KineFlowApplySparseCtrl.VALIDATE_INPUTS(frame_indices="0,8,15", strength=1.0, start_percent=0.0,
                                                   end_percent=1.0) is True


# --------------------------------------------------------------------------- parity with diffusers
@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_matches_diffusers_sparse_controlnet_through_the_loader(kind, tmp_path):
    """A tiny diffusers SparseControlNetModel with random weights, saved in the diffusers layout (safetensors, and a
    save_pretrained folder) and in guoyww's original layout (.ckpt, loaded with weights_only); every file loaded by
    Load SparseCtrl's loader gives diffusers' residuals."""
    reference = _diffusers_sparsectrl(kind)
    root = _models_dir(tmp_path)
    _save(reference.state_dict(), root / "controlnet" / f"{kind}_diffusers.safetensors")
    _save(diffusers_to_original(reference.state_dict()), root / "controlnet" / f"{kind}_original.ckpt")
    reference.save_pretrained(root / "controlnet" / f"{kind}_folder")

    batch, frames, size = 2, 5, 8
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, frames, size, size, generator=gen)
    context = torch.randn(batch * frames, 7, 32, generator=gen)
    condition, mask = _condition(kind, batch, frames, size, [0, 3])
    t = torch.tensor([700.0, 30.0])
    with torch.no_grad():
        expected_down, expected_mid = reference(x, t, context, condition, conditioning_scale=0.7,
                                                conditioning_mask=mask, return_dict=False)
    assert len(expected_down) == 4 and expected_mid.abs().max() > 1e-2
    errors = {}
    with host.configured(models_dir=root, device="cpu"):
        for name in (f"{kind}_diffusers.safetensors", f"{kind}_original.ckpt", f"{kind}_folder"):
            assert name in host.list_models("controlnet", include_folders=True)
            assert KineFlowLoadSparseCtrl.VALIDATE_INPUTS(sparsectrl_name=name) is True
            handle = ad_runtime.load_sparsectrl(name, "fp32")
            assert handle.kind == kind and handle.module.config.condition_mask
            with torch.no_grad():
                down, mid = handle.module(_frames_first(x), t.repeat_interleave(frames), context,
                                          _frames_first(condition), _frames_first(mask), frames, 0.7)
            errors[name] = max((a - b).abs().max().item() for a, b in zip([*down, mid], [*expected_down, expected_mid]))
    print(f"SparseCtrl {kind} parity, max abs error per file: {errors}")
    assert max(errors.values()) <= 1e-5, errors


def test_unet_residuals_match_diffusers_additional_residuals():
    """The UNet adds a control net's residuals where diffusers' UNet2DConditionModel adds
    down_block_additional_residuals and mid_block_additional_residual."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    reference = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()
    _randomise(reference, 1)
    sd = su.convert_state_dict(reference.state_dict(), "diffusers")
    unet = su.SD15UNet(su.config_from_state_dict(sd, num_heads=2)).eval()
    unet.load_state_dict(sd)
    gen = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(3, 4, 8, 8, generator=gen), torch.full((3,), 400.0), torch.randn(3, 5, 32, generator=gen)
    with torch.no_grad():
        # one residual per skip connection: conv_in, level 0's resnet+attention, its downsampler, level 1's resnet
        skips = [(3, 32, 8, 8), (3, 32, 8, 8), (3, 32, 4, 4), (3, 64, 4, 4)]
        down = [torch.randn(shape, generator=gen) * 0.3 for shape in skips]
        mid = torch.randn(3, 64, 4, 4, generator=gen) * 0.3
        expected = reference(x, t, ctx, down_block_additional_residuals=tuple(down),
                             mid_block_additional_residual=mid).sample
        got = unet(x, t, ctx, control=lambda: (down, mid))
        plain = unet(x, t, ctx)
        zeros = unet(x, t, ctx, control=lambda: ([d * 0.0 for d in down], mid * 0.0))
    assert (got - plain).abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(zeros, plain)
    with pytest.raises(ValueError, match="expected 4 control residuals"):
        unet(x, t, ctx, control=lambda: (down[:2], mid))


# --------------------------------------------------------------------------- handles on the tiny AnimateDiff model
def _tiny_sparsectrl_file(path, kind: str, seed: int = 5, layout: str = "original"):
    """A random SparseCtrl that fits the shipped tiny UNet (channels 32/64, one resnet per level, 64-wide text),
    written in the released layout."""
    config = sc.SparseCtrlConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                 attention_levels=(True, False), context_dim=64,
                                 **({} if kind == "rgb" else {"simplified_embedding": False, "condition_channels": 3,
                                                               "embedding_channels": (4, 8, 8, 16)}))
    model = sc.SparseCtrl(config)
    _randomise(model, seed, scale=0.1)
    sd = model.state_dict()
    for key in sd:  # the positional tables are the sinusoidal ones, as in the released files
        if key.endswith("pos_encoder.pe"):
            sd[key] = ad_sinusoid(sd[key].shape)
    return _save(original_layout(sd, config), path)


def ad_sinusoid(shape):
    from kineflow.models.animatediff import sinusoidal_table

    return sinusoidal_table(shape[1], shape[2])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsectrl_models")
    (root / "controlnet").mkdir()
    _tiny_sparsectrl_file(root / "controlnet" / "tiny_sparsectrl_rgb.safetensors", "rgb")
    _tiny_sparsectrl_file(root / "controlnet" / "tiny_sparsectrl_scribble.ckpt", "scribble")
    return root


@pytest.fixture(scope="module")
def parts(tiny_models):
    with host.configured(models_dir=tiny_models, device="cpu"):
        model, vae, text_encoder = ad_runtime.load_sd_checkpoint(TINY_CHECKPOINT)
        motion = ad_runtime.load_motion_module(TINY_MOTION)
        model = ad_runtime.apply_motion_module(model, motion)
        rgb = ad_runtime.load_sparsectrl("tiny_sparsectrl_rgb.safetensors")
        scribble = ad_runtime.load_sparsectrl("tiny_sparsectrl_scribble.ckpt")
        context = text_encoder.encode(["a red circle"])["context"]
    return model, vae, context, rgb, scribble


def _keyframes(count=2, size=64, seed=4):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def _net(model, context, frames=6, seed=0, t=500.0):
    x = torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    return model.net_fn(x, torch.tensor([t]), context)


def test_strength_zero_and_an_excluded_range_give_the_model_without_control(parts):
    model, vae, context, rgb, scribble = parts
    with host.configured(device="cpu"):
        plain = _net(model, context)
        for handle, kind_vae in ((rgb, vae), (scribble, None)):
            off = ad_runtime.apply_sparsectrl(model, handle, _keyframes(), (0, -1), strength=0.0, vae=kind_vae)
            late = ad_runtime.apply_sparsectrl(model, handle, _keyframes(), (0, -1), strength=1.0, start_percent=0.9,
                                               vae=kind_vae)  # t = 500 is at 50% of the sampling: not yet
            on = ad_runtime.apply_sparsectrl(model, handle, _keyframes(), (0, -1), strength=1.0, vae=kind_vae)
            half = ad_runtime.apply_sparsectrl(model, handle, _keyframes(), (0, -1), strength=0.5, vae=kind_vae)
            assert torch.equal(_net(off, context), plain)
            assert torch.equal(_net(late, context), plain)
            controlled, weaker = _net(on, context), _net(half, context)
            assert (controlled - plain).abs().max() > 1e-3
            assert 0 < (weaker - plain).abs().max() < (controlled - plain).abs().max()
            # the input handle is unchanged (ComfyUI caches node outputs)
            assert model.controls == () and len(on.controls) == 1


def test_rgb_keyframes_are_the_vae_latents_of_the_fitted_images(parts):
    model, vae, _context, rgb, _ = parts
    images = torch.rand(1, 96, 64, 3, generator=torch.Generator().manual_seed(7))  # taller than the video
    control = ad_runtime.apply_sparsectrl(model, rgb, images, (0,), vae=vae).controls[0]
    with host.configured(device="cpu"):
        prepared = control.condition(8, 8)
        square = images[:, 16:80]  # centre crop to the video's 1:1 aspect, already 64x64
        expected = vae.encode(square.permute(3, 0, 1, 2).unsqueeze(0) * 2 - 1, "auto", 1 << 30, lambda *a: None)
    assert prepared.shape == (1, 4, 8, 8)
    assert torch.allclose(prepared, expected[0].transpose(0, 1), atol=1e-5)
    assert control.condition(8, 8) is prepared  # prepared once per latent size


def test_the_control_net_sees_the_unets_inputs_and_each_windows_keyframes(parts, monkeypatch):
    model, vae, context, rgb, _ = parts
    calls = []
    forward = sc.SparseCtrl.forward

    def recording(self, x, timesteps, ctx, condition, mask, video_frames, scale=1.0):
        calls.append({"x": x.clone(), "t": timesteps.clone(), "context": ctx.clone(), "frames": video_frames,
                      "keyed": [i for i in range(mask.shape[0]) if mask[i].max() > 0]})
        return forward(self, x, timesteps, ctx, condition, mask, video_frames, scale)

    unet_calls = []
    unet_forward = su.SD15UNet.forward

    def recording_unet(self, x, timesteps, ctx, *args, **kwargs):
        unet_calls.append({"x": x.clone(), "t": timesteps.clone(), "context": ctx.clone()})
        return unet_forward(self, x, timesteps, ctx, *args, **kwargs)

    monkeypatch.setattr(sc.SparseCtrl, "forward", recording)
    monkeypatch.setattr(su.SD15UNet, "forward", recording_unet)
    controlled = ad_runtime.apply_sparsectrl(model, rgb, _keyframes(), (1, 9), vae=vae)
    x = torch.randn(2, 4, 12, 8, 8, generator=torch.Generator().manual_seed(1))  # a batch of 2 (e.g. both CFG halves)
    two_contexts = torch.cat([context, torch.zeros_like(context)])
    options = ContextOptions(length=6, overlap=2, stride=1, schedule="static", fuse_method="flat")

    def denoiser(latent, sigma):
        return controlled.net_fn(latent, torch.full((latent.shape[0],), 400.0), two_contexts)

    with host.configured(device="cpu"), torch.no_grad():
        context_window_denoiser(denoiser, options)(x, torch.tensor([1.0, 1.0]))
    # windows [0..5], [4..9], [6..11]: keyframe 1 in the first, keyframe 9 in the last two
    assert [c["keyed"] for c in calls] == [[1, 7], [5, 11], [3, 9]]
    assert len(unet_calls) == 3
    for call, unet_call in zip(calls, unet_calls):
        assert call["frames"] == 6 and call["x"].shape[0] == 12
        assert torch.equal(call["x"], unet_call["x"]) and torch.equal(call["t"], unet_call["t"])
        assert torch.equal(call["context"], unet_call["context"])
    calls.clear()
    options = ContextOptions(length=4, overlap=1, stride=1, schedule="static", fuse_method="flat")
    with host.configured(device="cpu"), torch.no_grad():
        context_window_denoiser(denoiser, options)(x, torch.tensor([1.0, 1.0]))
    # windows [0..3], [3..6], [6..9], [8..11]: the second has no keyframe and runs without the control
    assert [c["keyed"] for c in calls] == [[1, 5], [3, 7], [1, 5]]


def test_a_step_the_step_cache_skips_runs_no_control_net(parts, monkeypatch):
    """The control net's residuals only feed the blocks a skipped step does not run, so it is not run either."""
    model, vae, context, rgb, _ = parts
    calls = []
    forward = sc.SparseCtrl.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    class ReuseAfterFirst:  # a step cache that runs the first call and skips every later one
        residual = None

        def reuse(self, probe):
            return self.residual

        def store(self, residual):
            self.residual = residual

    controlled = ad_runtime.apply_sparsectrl(model, rgb, _keyframes(), (0, -1), vae=vae)
    x = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    with host.configured(device="cpu"):
        expected = controlled.net_fn(x, torch.tensor([500.0]), context)
        monkeypatch.setattr(sc.SparseCtrl, "forward", counting)
        cache = ReuseAfterFirst()
        first = controlled.net_fn(x, torch.tensor([500.0]), context, step_cache=cache)
        assert len(calls) == 1 and torch.allclose(first, expected, atol=1e-6)
        skipped = controlled.net_fn(x, torch.tensor([480.0]), context, step_cache=cache)
    assert len(calls) == 1  # the skipped step ran no control net
    assert torch.allclose(skipped, first, atol=1e-4)  # same input, the cached residual: nearly the same estimate


@pytest.mark.parametrize("offload", ["blocks", "sequential"])
def test_offloading_keeps_the_residuals(offload, tiny_models):
    """Block swap and layer-by-layer offload (weights read from the file on the CPU) give the resident model's
    residuals bit for bit."""
    gen = torch.Generator().manual_seed(6)
    frames = 4
    x, t = torch.randn(frames, 4, 8, 8, generator=gen), torch.full((frames,), 300.0)
    context = torch.randn(frames, 77, 64, generator=gen)
    condition, mask = torch.randn(frames, 4, 8, 8, generator=gen), torch.ones(frames, 1, 8, 8)
    outputs = {}
    with host.configured(models_dir=tiny_models, device="cpu"):
        for policy in ("full", offload):
            handle = ad_runtime.load_sparsectrl("tiny_sparsectrl_rgb.safetensors", "fp32", policy)
            assert handle.residency.policy == policy
            with handle.residency.active(), torch.no_grad():
                outputs[policy] = handle.module(x, t, context, condition, mask, frames)
    for a, b in zip([*outputs["full"][0], outputs["full"][1]], [*outputs[offload][0], outputs[offload][1]]):
        assert torch.equal(a, b)


def test_clear_errors(parts, tiny_models, tmp_path):
    model, _vae, context, rgb, scribble = parts
    with pytest.raises(KineFlowError, match="connect the VAE from Load SD Checkpoint"):
        ad_runtime.apply_sparsectrl(model, rgb, _keyframes(), (0, 1))
    with pytest.raises(KineFlowError, match=r"got 2 keyframe image\(s\) and 3 frame index\(es\) \(0, 4, 8\)"):
        ad_runtime.apply_sparsectrl(model, scribble, _keyframes(), (0, 4, 8))
    far = ad_runtime.apply_sparsectrl(model, scribble, _keyframes(), (0, 20))
    with host.configured(device="cpu"), pytest.raises(KineFlowError, match="frame 20, outside this video's 6 frames"):
        _net(far, context)
    wide = sc.SparseCtrl(sc.SparseCtrlConfig.tiny("scribble"))
    with pytest.raises(ModelFileError, match=r"does not fit this UNet: it has channels \[32, 64\] with 1 resnets per "
                                             r"level, a 32-wide text context"):
        ad_runtime.apply_sparsectrl(model, ad_runtime.SparseCtrlHandle(wide, "x"), _keyframes(), (0, 1))

    # a motion module, and an image ControlNet, given to Load SparseCtrl
    root = _models_dir(tmp_path)
    shutil.copy(host.SHIPPED_WEIGHTS_DIR / "animatediff_models" / TINY_MOTION, root / "controlnet" / "mm.safetensors")
    image_controlnet = {k: v for k, v in checkpoints.load_tensors(checkpoints.read_header(
        tiny_models / "controlnet" / "tiny_sparsectrl_rgb.safetensors")).items() if ".motion_modules." not in k}
    _save(image_controlnet, root / "controlnet" / "image_controlnet.safetensors")
    with host.configured(models_dir=root, device="cpu"):
        message = KineFlowLoadSparseCtrl.VALIDATE_INPUTS(sparsectrl_name="mm.safetensors")
        assert "is a animatediff_motion_module, v2, original layout checkpoint; this loader expects a AnimateDiff " \
               "SparseCtrl (Load SparseCtrl). It belongs in: AnimateDiff motion module (Load Motion Module)" in message
        with pytest.raises(ModelFileError, match="this loader expects a AnimateDiff SparseCtrl"):
            ad_runtime.load_sparsectrl("mm.safetensors")
        with pytest.raises(ModelFileError, match="an SD ControlNet without temporal modules"):
            ad_runtime.load_sparsectrl("image_controlnet.safetensors")


# --------------------------------------------------------------------------- nodes end to end
class _Keyframes:
    """Test IMAGE source: two random keyframes."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 100})}}

    def make(self, seed):
        return (_keyframes(seed=seed),)


class _Sink:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "take"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}

    def take(self, value):
        return ()


def _workflow(sparsectrl_name: str, strength: float, frames: int = 8, context_options: bool = False) -> dict:
    prompt = {
        "1": {"class_type": "KineFlowLoadSDCheckpoint", "inputs": {"ckpt_name": TINY_CHECKPOINT, "prediction": "eps",
                                                                   "dtype": "auto"}},
        "2": {"class_type": "KineFlowLoadMotionModule", "inputs": {"model_name": TINY_MOTION, "dtype": "auto"}},
        "3": {"class_type": "KineFlowApplyMotionModule", "inputs": {"model": ["1", 0], "motion_module": ["2", 0],
                                                                    "scale": 1.0}},
        "4": {"class_type": "KineFlowLoadSparseCtrl", "inputs": {"sparsectrl_name": sparsectrl_name, "dtype": "auto"}},
        "5": {"class_type": "TestKeyframes", "inputs": {"seed": 3}},
        "6": {"class_type": "KineFlowApplySparseCtrl", "inputs": {
            "model": ["3", 0], "sparsectrl": ["4", 0], "images": ["5", 0], "frame_indices": "0,-1",
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 1]}},
        "7": {"class_type": "KineFlowTextEncode", "inputs": {"text_encoder": ["1", 2], "prompt": "a red circle",
                                                              "negative_prompt": "blurry"}},
        "8": {"class_type": "KineFlowEmptyVideoLatent", "inputs": {"width": 64, "height": 64, "frames": frames,
                                                                   "batch_size": 1, "latent_format": "sd15"}},
        "9": {"class_type": "KineFlowSampler", "inputs": {
            "model": ["6", 0], "conditioning": ["7", 0], "latent": ["8", 0], "seed": 1, "steps": 2, "cfg": 3.0,
            "shift": 1.0, "embedded_guidance": 6.0, "sampler_name": "euler", "scheduler": "default", "denoise": 1.0}},
        "10": {"class_type": "KineFlowVAEDecode", "inputs": {"vae": ["1", 1], "latent": ["9", 0], "tiling": "auto",
                                                             "tile_size": 256, "tile_overlap": 64, "tile_frames": 16,
                                                             "frame_overlap": 4}},
        "11": {"class_type": "TestSink", "inputs": {"value": ["10", 0]}},
    }
    if context_options:
        prompt["12"] = {"class_type": "KineFlowContextOptions", "inputs": {
            "length": 6, "overlap": 2, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}
        prompt["9"]["inputs"]["context_options"] = ["12", 0]
    return prompt


NODES = dict(NODE_CLASS_MAPPINGS, TestKeyframes=_Keyframes, TestSink=_Sink)


@pytest.mark.parametrize("name", ["tiny_sparsectrl_rgb.safetensors", "tiny_sparsectrl_scribble.ckpt"])
def test_nodes_end_to_end_on_the_shipped_tiny_model(name, tiny_models, tmp_path):
    cache = OutputCache()

    def frames(strength, **kwargs):
        results = run_workflow(json.loads(json.dumps(_workflow(name, strength, **kwargs))), node_classes=NODES,
                               models_dir=tiny_models, output_dir=tmp_path, device="cpu", cache=cache)
        return results["10"]["outputs"][0]

    full, none = frames(1.0), frames(0.0)
    assert full.shape == (8, 64, 64, 3) and bool(torch.isfinite(full).all())
    assert (full - none).abs().mean() > 1e-3, "strength should change the video"
    prompt = _workflow(name, 1.0)
    prompt["9"]["inputs"]["model"] = ["3", 0]  # the Sampler on the model without SparseCtrl
    without = run_workflow(prompt, node_classes=NODES, models_dir=tiny_models, output_dir=tmp_path, device="cpu",
                           cache=cache)["10"]["outputs"][0]
    assert torch.equal(none, without), "strength 0 must give the model without SparseCtrl"
    windowed = frames(1.0, frames=12, context_options=True)
    assert windowed.shape == (12, 64, 64, 3) and bool(torch.isfinite(windowed).all())


def test_sparsectrl_runs_on_the_compute_device(tiny_models, tmp_path):
    """Every path on `meta` (a non-CPU device): loader, keyframe preparation (VAE encode of rgb keyframes), CFG,
    context windows; device_check fails any operation that mixes a CPU tensor with a device one."""
    for name in ("tiny_sparsectrl_rgb.safetensors", "tiny_sparsectrl_scribble.ckpt"):
        prompt = _workflow(name, 0.8, frames=12, context_options=True)
        out_dir = tmp_path / "out"
        with host.configured(device="meta", models_dir=tiny_models, output_dir=out_dir), one_device() as mode:
            results = run_workflow(prompt, node_classes=NODES, models_dir=tiny_models, output_dir=out_dir,
                                   cache=OutputCache())
        assert mode.ops_on.get("meta", 0) > 100
        assert results["10"]["outputs"][0].shape == (12, 64, 64, 3) and results["10"]["outputs"][0].is_meta
        handle = results["4"]["outputs"][0]
        assert all(p.is_meta for p in handle.module.parameters())
