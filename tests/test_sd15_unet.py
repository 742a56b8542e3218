"""SD1.5 UNet: exact key/shape match with the released LDM layout, diffusers parity, the motion-module seam."""

import pytest
import torch

from checkpoint_fixtures import manifest, manifest_shapes
from kineflow.models import checkpoints
from kineflow.models.sd15_unet import (
    SD15UNet, SD15UNetConfig, config_from_state_dict, convert_state_dict, group_norm,
)
from kineflow.errors import ModelFileError


def test_full_model_matches_the_ldm_checkpoint_layout():
    shapes = manifest_shapes("sd15_unet_ldm")
    det = checkpoints.detect(shapes)
    assert (det.family, det.layout, det.prefix) == ("sd15_unet", "ldm", "model.diffusion_model.")
    internal = convert_state_dict(shapes, det.layout)
    config = config_from_state_dict(internal)
    assert config == SD15UNetConfig.full()
    with torch.device("meta"):
        model = SD15UNet(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == internal
    assert sum(v.numel() for v in model.state_dict().values()) == manifest("sd15_unet_ldm")["num_params"]


@pytest.fixture(scope="module")
def diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32,
    ).eval()
    for p in unet.parameters():  # diffusers zero-initialises some outputs; random weights exercise every path
        p.data.normal_(0, 0.05)
    return unet


def test_matches_diffusers_unet(diffusers_unet):
    sd = convert_state_dict(diffusers_unet.state_dict(), "diffusers")
    config = config_from_state_dict(sd, num_heads=2)
    assert config == SD15UNetConfig.tiny()
    model = SD15UNet(config).eval()
    model.load_state_dict(sd)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = diffusers_unet(x, t, context).sample
        got = model(x, t, context)
    assert expected.abs().max() > 1e-2
    assert (got - expected).abs().max() <= 1e-4


class RecordingHooks:
    """Adds a distinct constant at every call so order-insensitive bugs still change the output."""

    def __init__(self, add: float = 0.0, norm_across_frames: bool = False):
        self.calls, self.add, self.norm_across_frames = [], add, norm_across_frames

    def down(self, level, index, h, frames):
        self.calls.append(("down", level, index, h.shape[1], frames))
        return h + self.add

    def mid(self, h, frames):
        self.calls.append(("mid", h.shape[1], frames))
        return h + self.add

    def up(self, level, index, h, frames):
        self.calls.append(("up", level, index, h.shape[1], frames))
        return h + self.add


def test_temporal_hooks_run_at_every_insertion_point():
    torch.manual_seed(0)
    model = SD15UNet(SD15UNetConfig.tiny()).eval()
    x, t, ctx = torch.randn(6, 4, 8, 8), torch.full((6,), 500.0), torch.randn(6, 3, 32)
    hooks = RecordingHooks()
    with torch.no_grad():
        plain = model(x, t, ctx)
        hooked = model(x, t, ctx, video_frames=3, temporal=hooks)
        shifted = model(x, t, ctx, video_frames=3, temporal=RecordingHooks(add=0.1))
    assert hooks.calls == [
        ("down", 0, 0, 32, 3), ("down", 1, 0, 64, 3), ("mid", 64, 3),
        ("up", 0, 0, 64, 3), ("up", 0, 1, 64, 3), ("up", 1, 0, 32, 3), ("up", 1, 1, 32, 3),
    ]
    assert torch.equal(plain, hooked)  # identity hooks change nothing
    assert not torch.allclose(plain, shifted)
    with pytest.raises(ValueError, match="cannot be split into videos of 4 frames"):
        model(x, t, ctx, video_frames=4, temporal=hooks)


def test_group_norm_across_frames_shares_statistics_over_each_video():
    norm = torch.nn.GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(6, 8, 5, 5)  # 2 videos x 3 frames
    shared = group_norm(norm, x, frames=3)
    video = x.reshape(2, 3, 8, 5, 5).transpose(1, 2)
    expected = torch.nn.functional.group_norm(video, 4, norm.weight, norm.bias, norm.eps).transpose(1, 2).reshape(6, 8, 5, 5)
    assert torch.allclose(shared, expected, atol=1e-6)
    assert torch.equal(group_norm(norm, x), norm(x))
    assert not torch.allclose(shared, norm(x), atol=1e-3)


def test_unknown_layout_and_foreign_keys_are_rejected():
    with pytest.raises(ModelFileError, match="expected 'ldm' or 'diffusers'"):
        convert_state_dict({}, "comfy")
    with pytest.raises(ModelFileError, match="maps to no SD1.5 UNet layer"):
        convert_state_dict({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "add_embedding.linear_1.weight": torch.zeros(1)}, "diffusers")
