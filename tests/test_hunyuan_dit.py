"""HunyuanVideo DiT: checkpoint layouts against the real key manifests, and numerical parity with diffusers."""

import pytest
import torch

from checkpoint_fixtures import manifest
from kineflow.models.hunyuan_video_dit import (
    HunyuanVideoDiT,
    HunyuanVideoDiTConfig,
    config_from_state_dict,
    convert_state_dict,
    detect_layout,
    unwrap_checkpoint,
)
from kineflow.errors import ModelFileError

LAYOUTS = ("original", "comfy", "diffusers")


def manifest_meta_state_dict(layout: str) -> dict:
    tensors = manifest(f"hunyuan_video_dit_{layout}")["tensors"]
    return {k: torch.empty(v["shape"], device="meta") for k, v in tensors.items()}


@pytest.fixture(scope="module")
def full_model_shapes():
    with torch.device("meta"):
        model = HunyuanVideoDiT(HunyuanVideoDiTConfig.full())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_manifest_converts_to_exactly_the_model_keys(layout, full_model_shapes):
    sd = manifest_meta_state_dict(layout)
    assert detect_layout(sd.keys()) == layout
    converted = convert_state_dict(sd, layout)
    shapes = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(shapes) ^ set(full_model_shapes)) == []
    assert {k: s for k, s in shapes.items() if s != full_model_shapes[k]} == {}
    assert config_from_state_dict(shapes) == HunyuanVideoDiTConfig.full()


def test_wrappers_and_prefixes_are_recognised():
    comfy = manifest_meta_state_dict("comfy")
    prefixed = {"model.diffusion_model." + k: v for k, v in comfy.items()}
    assert detect_layout(prefixed.keys()) == "comfy"
    assert convert_state_dict(prefixed, "comfy").keys() == convert_state_dict(comfy, "comfy").keys()
    original = manifest_meta_state_dict("original")
    assert detect_layout({"module": original}.keys()) is None
    assert unwrap_checkpoint({"module": original}) is original
    assert detect_layout(["model.diffusion_model.input_blocks.0.0.weight"]) is None


def test_unknown_diffusers_key_is_reported():
    sd = manifest_meta_state_dict("diffusers")
    sd["transformer_blocks.0.attn.to_extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ModelFileError, match="to_extra"):
        convert_state_dict(sd, "diffusers")


def test_tiny_config_round_trips_through_its_weights():
    cfg = HunyuanVideoDiTConfig.tiny()
    with torch.device("meta"):
        model = HunyuanVideoDiT(cfg)
    assert config_from_state_dict(model.state_dict()) == cfg


def tiny_inputs(batch=2, text_len=10):
    g = torch.Generator().manual_seed(1)
    cfg = HunyuanVideoDiTConfig.tiny()
    x = torch.randn(batch, cfg.in_channels, 3, 8, 12, generator=g)
    text = torch.randn(batch, text_len, cfg.text_states_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[0, 6:] = 0  # right padding, of different lengths per batch item
    if batch > 1:
        mask[1, 8:] = 0
    pooled = torch.randn(batch, cfg.text_states_dim_2, generator=g)
    t = torch.linspace(900.0, 250.0, batch)
    guidance = torch.full((batch,), 6000.0)  # embedded guidance 6.0, on the x1000 scale
    return x, t, text, mask, pooled, guidance


def test_parity_with_diffusers_transformer():
    diffusers = pytest.importorskip("diffusers")
    cfg = HunyuanVideoDiTConfig.tiny()
    torch.manual_seed(0)
    ref = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.mm_double_blocks_depth,
        num_single_layers=cfg.mm_single_blocks_depth, num_refiner_layers=cfg.refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        guidance_embeds=True, text_embed_dim=cfg.text_states_dim, pooled_projection_dim=cfg.text_states_dim_2,
        rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list,
    ).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight matter at a useful scale
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    sd = ref.state_dict()
    assert detect_layout(sd.keys()) == "diffusers"
    converted = convert_state_dict(sd, "diffusers")
    assert config_from_state_dict(converted) == cfg
    model = HunyuanVideoDiT(cfg).eval()
    model.load_state_dict(converted, strict=True)

    x, t, text, mask, pooled, guidance = tiny_inputs()
    with torch.inference_mode():
        expected = ref(x, t, text, mask, pooled, guidance, return_dict=False)[0]
        got = model(x, t, text, mask, pooled, guidance)
    assert got.shape == x.shape
    assert expected.abs().max() > 0.5
    assert (got - expected).abs().max().item() <= 1e-4


def test_padding_is_ignored_and_real_tokens_are_not():
    torch.manual_seed(0)
    model = HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():  # the original zero-inits modulations; random weights exercise every path
            p.normal_(0.0, 0.1)
    x, t, text, mask, pooled, guidance = tiny_inputs(batch=1)
    with torch.inference_mode():
        padded = model(x, t, text, mask, pooled, guidance)
        trimmed = model(x, t, text[:, :6], mask[:, :6], pooled, guidance)
        garbage = text.clone()
        garbage[:, 6:] = 100.0
        padded_garbage = model(x, t, garbage, mask, pooled, guidance)
        unmasked = model(x, t, text, torch.ones_like(mask), pooled, guidance)
    assert (padded - trimmed).abs().max() < 1e-5
    assert (padded - padded_garbage).abs().max() < 1e-5
    assert (padded - unmasked).abs().max() > 1e-3


def test_guidance_is_required_for_the_distilled_model():
    from kineflow.errors import KineFlowError

    model = HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()).eval()
    x, t, text, mask, pooled, _ = tiny_inputs(batch=1)
    with pytest.raises(KineFlowError, match="guidance"):
        model(x, t, text, mask, pooled, None)
