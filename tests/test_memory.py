"""fp8 weight storage and meta-device loading, exercised on the tiny HunyuanVideo DiT."""

import pytest
import torch
import torch.nn as nn

from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT, HunyuanVideoDiTConfig
from kineflow.errors import ModelFileError
from kineflow.models.weights import FP8_DTYPE, cast_linear_weights_fp8, load_into_meta_model


def random_tiny_state_dict():
    torch.manual_seed(0)
    model = HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def inputs():
    g = torch.Generator().manual_seed(3)
    cfg = HunyuanVideoDiTConfig.tiny()
    return (
        torch.randn(1, cfg.in_channels, 2, 4, 6, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 7, cfg.text_states_dim, generator=g),
        torch.ones(1, 7),
        torch.randn(1, cfg.text_states_dim_2, generator=g),
        torch.tensor([6000.0]),
    )


def test_load_into_meta_model_matches_a_normally_built_model():
    sd = random_tiny_state_dict()
    reference = HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()).eval()
    reference.load_state_dict(sd)
    loaded = load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.float32)
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.inference_mode():
        assert torch.equal(loaded(*inputs()), reference(*inputs()))

    half = load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        out = half(*inputs())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_load_into_meta_model_reports_missing_and_misshaped_keys():
    sd = random_tiny_state_dict()
    del sd["final_layer.linear.bias"]
    with pytest.raises(ModelFileError, match="missing.*final_layer.linear.bias"):
        load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.float32)
    sd = random_tiny_state_dict()
    sd["img_in.proj.bias"] = torch.zeros(3)
    with pytest.raises(ModelFileError, match=r"img_in.proj.bias: expected \(64,\), found \(3,\)"):
        load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.float32)


def test_fp8_storage_keeps_names_and_stays_close_to_fp32():
    sd = random_tiny_state_dict()
    reference = load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.float32)
    fp8 = load_into_meta_model(HunyuanVideoDiT, HunyuanVideoDiTConfig.tiny(), sd, torch.float32, fp8=True)
    fp8_sd = fp8.state_dict()
    assert fp8_sd.keys() == sd.keys()
    linear_weights = {f"{n}.weight" for n, m in fp8.named_modules() if isinstance(m, nn.Linear)}
    assert linear_weights and all(fp8_sd[k].dtype == FP8_DTYPE for k in linear_weights)
    assert all(v.dtype == torch.float32 for k, v in fp8_sd.items() if k not in linear_weights)
    with torch.inference_mode():
        expected, got = reference(*inputs()), fp8(*inputs())
    rel = ((got - expected).norm() / expected.norm()).item()
    assert 0 < rel < 0.1  # fp8 rounding is visible but small


def test_cast_linear_weights_fp8_in_place_on_a_built_model():
    sd = random_tiny_state_dict()
    model = HunyuanVideoDiT(HunyuanVideoDiTConfig.tiny()).eval()
    model.load_state_dict(sd)
    with torch.inference_mode():
        expected = model(*inputs())
    assert cast_linear_weights_fp8(model, torch.float32) is model
    assert model.double_blocks[0].img_attn_qkv.weight.dtype == FP8_DTYPE
    assert model.state_dict().keys() == sd.keys()
    with torch.inference_mode():
        got = model(*inputs())
    assert ((got - expected).norm() / expected.norm()).item() < 0.1
