"""AnimateDiff motion modules: exact layouts of the released v1/v2/v3 files, diffusers parity, strength,
motion LoRA and the v3 domain adapter, and clear errors for modules that do not fit."""

import pytest
import torch
from torch import nn

from checkpoint_fixtures import manifest_shapes
from kineflow.models import animatediff as ad
from kineflow.models import sd15_unet as su
from kineflow.errors import ModelFileError

RELEASES = [("animatediff_mm_sd_v15_v1", "v1", 24), ("animatediff_mm_sd_v15_v2", "v2", 32), ("animatediff_v3_sd15_mm", "v3", 32)]


@pytest.mark.parametrize("name,version,frames", RELEASES)
def test_full_module_matches_the_released_layout(name, version, frames):
    shapes = manifest_shapes(name)
    assert ad.detect_version(shapes) == version
    config = ad.config_from_state_dict(ad.convert_state_dict(shapes, "original"))
    assert config == ad.MotionModuleConfig.full(version)
    assert config.max_frames == frames and config.mid_block == (version == "v2")
    with torch.device("meta"):
        module = ad.MotionModule(config)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes


def test_positional_table_is_the_sinusoidal_one():
    pe = ad.MotionModule(ad.MotionModuleConfig.tiny("v1")).state_dict()[
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"]
    assert pe.shape == (1, 24, 32)
    assert torch.allclose(pe[0, 3, 0::2], torch.sin(3 * 10000 ** (-torch.arange(0, 32, 2) / 32)), atol=1e-6)
    assert torch.allclose(pe[0, 5, 1::2], torch.cos(5 * 10000 ** (-torch.arange(0, 32, 2) / 32)), atol=1e-6)


def test_foreign_modules_are_rejected_with_what_was_found():
    shapes = manifest_shapes("animatediff_mm_sd_v15_v2")
    sdxl_like = {k: v for k, v in shapes.items() if not k.startswith(("down_blocks.3.", "up_blocks.3.", "mid_block."))}
    with pytest.raises(ModelFileError, match=r"motion module for sdxl \(3 down blocks\), not for SD1.5"):
        ad.detect_version(sdxl_like)
    unet = su.SD15UNet(su.SD15UNetConfig.tiny())
    wide = ad.MotionModule(ad.MotionModuleConfig(version="v3", block_channels=(64, 128), layers_per_block=1, mid_block=False, heads=2))
    with pytest.raises(ModelFileError, match=r"it has channels \[64, 128\] with 1 modules per level, the UNet expects channels \[32, 64\]"):
        ad.attach(unet, wide)


def _video_inputs(batch=1, frames=4, size=8, context_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * frames, 4, size, size, generator=gen)
    ctx = torch.randn(batch, 5, context_dim, generator=gen).repeat_interleave(frames, 0)
    return x, torch.full((batch * frames,), 400.0), ctx


def _randomise(module: nn.Module, seed: int) -> None:
    """Released modules are trained; zero-initialised proj_out would make every temporal path a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.05


@pytest.fixture()
def tiny_video_model():
    torch.manual_seed(0)
    unet = su.SD15UNet(su.SD15UNetConfig.tiny()).eval()
    _randomise(unet, 1)
    motion = ad.MotionModule(ad.MotionModuleConfig.tiny("v2")).eval()
    _randomise(motion, 2)
    return ad.attach(unet, motion)


def test_scale_zero_gives_the_per_frame_unet(tiny_video_model):
    x, t, ctx = _video_inputs()
    with torch.no_grad():
        per_frame = tiny_video_model.unet(x, t, ctx)
        animated = tiny_video_model(x, t, ctx, video_frames=4)
        tiny_video_model.motion.scale = 0.0
        still = tiny_video_model(x, t, ctx, video_frames=4)
        tiny_video_model.motion.scale = 0.5
        half = tiny_video_model(x, t, ctx, video_frames=4)
    assert torch.equal(still, per_frame)
    assert (animated - per_frame).abs().max() > 1e-3
    assert not torch.allclose(half, animated) and not torch.allclose(half, per_frame)


def test_too_many_frames_for_the_positional_table(tiny_video_model):
    x, t, ctx = _video_inputs(frames=33, size=8)
    with pytest.raises(ModelFileError, match="at most 32 frames at once .* found 33"):
        tiny_video_model(x, t, ctx, video_frames=33)


def test_v1_shares_resnet_norm_statistics_across_frames():
    torch.manual_seed(0)
    unet = su.SD15UNet(su.SD15UNetConfig.tiny()).eval()
    motion = ad.MotionModule(ad.MotionModuleConfig.tiny("v1")).eval()
    motion.scale = 0.0
    x, t, ctx = _video_inputs(frames=3)
    with torch.no_grad():
        shared = ad.attach(unet, motion)(x, t, ctx, video_frames=3)
        per_frame = unet(x, t, ctx)
        single = ad.attach(unet, motion)(x[:1], t[:1], ctx[:1], video_frames=1)
        single_per_frame = unet(x[:1], t[:1], ctx[:1])
    assert motion.norm_across_frames and not ad.MotionModuleConfig.tiny("v3").norm_across_frames
    assert not torch.allclose(shared, per_frame, atol=1e-4)
    # A one-frame video has nothing to share. Compared at the same batch size: a batch of 3 and a batch of 1
    # take different matmul blockings, which alone differ by ~1e-6.
    assert torch.allclose(single, single_per_frame, atol=1e-6)


class _PerFrameGroupNorm(nn.GroupNorm):
    """diffusers normalises [B, C, F, H, W] across frames; guoyww's AnimateDiff (and KineFlow) per frame."""

    def forward(self, x):
        b, c, f, h, w = x.shape
        return super().forward(x.transpose(1, 2).reshape(b * f, c, h, w)).reshape(b, f, c, h, w).transpose(1, 2)


def test_matches_diffusers_unet_motion_model():
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
    )
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_max_seq_length=32, use_motion_mid_block=True, motion_norm_num_groups=32)
    for model, seed in ((unet2d, 1), (adapter, 2)):
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.05
    reference = UNetMotionModel.from_unet2d(unet2d, adapter).eval()
    for layer in reference.modules():
        if type(layer).__name__ == "AnimateDiffTransformer3D":
            norm = _PerFrameGroupNorm(layer.norm.num_groups, layer.norm.num_channels, layer.norm.eps)
            norm.load_state_dict(layer.norm.state_dict())
            layer.norm = norm

    unet = su.SD15UNet(su.config_from_state_dict(su.convert_state_dict(unet2d.state_dict(), "diffusers"), num_heads=2))
    unet.load_state_dict(su.convert_state_dict(unet2d.state_dict(), "diffusers"))
    motion_sd = ad.convert_state_dict(adapter.state_dict(), "diffusers")
    motion = ad.MotionModule(ad.config_from_state_dict(motion_sd, version="v2", heads=2))
    motion.load_state_dict(motion_sd)
    model = ad.attach(unet, motion).eval()

    batch, frames = 2, 4
    x, t, ctx = _video_inputs(batch=batch, frames=frames)
    t = torch.tensor([30.0, 800.0]).repeat_interleave(frames)
    with torch.no_grad():
        expected = reference(x.unflatten(0, (batch, frames)).transpose(1, 2), t[::frames], ctx).sample
        got = model(x, t, ctx, video_frames=frames).unflatten(0, (batch, frames)).transpose(1, 2)
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-4


def _motion_lora(module: ad.MotionModule, rank: int = 2, seed: int = 3) -> dict:
    """A LoRA in the released motion-LoRA format for every temporal attention projection (incl. mid block)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, layer in module.named_modules():
        if ".attention_blocks." in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            base, proj = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[: -len(".to_out.0")], "to_out")
            out_f, in_f = layer.weight.shape
            lora[f"{base}.processor.{proj}_lora.down.weight"] = torch.randn(rank, in_f, generator=gen) * 0.1
            lora[f"{base}.processor.{proj}_lora.up.weight"] = torch.randn(out_f, rank, generator=gen) * 0.1
    return lora


def test_motion_lora_strength(tiny_video_model):
    motion = tiny_video_model.motion
    lora = _motion_lora(motion)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_out_lora.up.weight" in lora
    x, t, ctx = _video_inputs()
    before_weights = {k: v.clone() for k, v in motion.state_dict().items()}
    with torch.no_grad():
        before = tiny_video_model(x, t, ctx, video_frames=4)
        ad.apply_motion_lora(motion, lora, strength=0.0)
        assert torch.equal(tiny_video_model(x, t, ctx, video_frames=4), before)
        ad.apply_motion_lora(motion, lora, strength=1.0)
        after = tiny_video_model(x, t, ctx, video_frames=4)
    key = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0.weight"
    stem = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_out_lora"
    expected = before_weights[key] + lora[f"{stem}.up.weight"] @ lora[f"{stem}.down.weight"]
    assert torch.allclose(motion.state_dict()[key], expected, atol=1e-6)
    assert (after - before).abs().max() > 1e-4


def test_v2_motion_lora_on_a_module_without_mid_block():
    v2 = ad.MotionModule(ad.MotionModuleConfig.tiny("v2"))
    v3 = ad.MotionModule(ad.MotionModuleConfig.tiny("v3"))
    ad.apply_motion_lora(v3, _motion_lora(v2), strength=1.0)  # mid-block entries are skipped
    with pytest.raises(ModelFileError, match="targets 'down_blocks.5"):
        ad.apply_motion_lora(v3, {"down_blocks.5.motion_modules.0.temporal_transformer.x.processor.to_q_lora.down.weight": torch.zeros(1, 32),
                                  "down_blocks.5.motion_modules.0.temporal_transformer.x.processor.to_q_lora.up.weight": torch.zeros(32, 1)})


def test_domain_adapter_merges_into_the_mapped_ldm_layers():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet2d = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
    ).eval()
    sd = su.convert_state_dict(unet2d.state_dict(), "diffusers")
    unet = su.SD15UNet(su.config_from_state_dict(sd, num_heads=2)).eval()
    unet.load_state_dict(sd)
    gen = torch.Generator().manual_seed(4)
    adapter, pairs = {}, {}
    for name, layer in unet2d.named_modules():  # v3_sd15_adapter format: diffusers UNet names, processor LoRAs
        if ".attentions." in name and ".attn" in name and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            base, proj = (name[: -len(".to_out.0")], "to_out") if name.endswith("to_out.0") else name.rsplit(".", 1)
            down = torch.randn(2, layer.weight.shape[1], generator=gen) * 0.2
            up = torch.randn(layer.weight.shape[0], 2, generator=gen) * 0.2
            adapter[f"{base}.processor.{proj}_lora.down.weight"], adapter[f"{base}.processor.{proj}_lora.up.weight"] = down, up
            pairs[name] = (up, down)
    assert any(k.startswith("up_blocks.1.attentions.1.") for k in adapter)

    x, t, ctx = _video_inputs(frames=2)
    with torch.no_grad():
        plain = unet(x, t, ctx)
        ad.merge_unet_lora(unet, adapter, strength=0.0)
        assert torch.equal(unet(x, t, ctx), plain)
        ad.merge_unet_lora(unet, adapter, strength=0.7)
        for name, (up, down) in pairs.items():  # the same merge done on the diffusers model by name
            unet2d.get_submodule(name).weight += 0.7 * up @ down
        expected = unet2d(x, t, ctx).sample
        merged = unet(x, t, ctx)
    assert (merged - plain).abs().max() > 1e-3
    assert (merged - expected).abs().max() <= 1e-4
