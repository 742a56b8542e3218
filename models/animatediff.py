"""AnimateDiff motion modules (v1 / v2 / v3 for SD1.5), motion LoRAs, the v3 domain adapter, and attaching a
motion module to an `SD15UNet`.

A motion module is a temporal transformer inserted after every resnet/attention pair of the UNet's down and up
path (and, for v2, inside the middle block). It mixes information across the F frames of a video at each
pixel: GroupNorm (per frame) -> linear proj_in -> [self-attention over frames, with a sinusoidal position
table added to the normalised input of each attention] x2 -> GEGLU feed-forward -> proj_out (zero-initialised),
added back to its input. Keys are the released checkpoints' (`down_blocks.N.motion_modules.M.temporal_transformer.*`),
including every attention's `pos_encoder.pe` table, whose length (24 for v1, 32 for v2/v3) caps the frames per
window.

Version notes (guoyww/AnimateDiff configs): v2 adds the mid-block module; v1 was trained with the UNet's resnet
group norms sharing statistics across frames (`norm_across_frames`), v2/v3 normalise each frame alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import ModelFileError
from . import checkpoints, weights
from .sd15_unet import Attention, FeedForward, SD15UNet, diffusers_module_to_ldm

VERSIONS = ("v1", "v2", "v3")


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MotionModuleConfig:
    version: str = "v2"
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # UNet channels of each down level
    layers_per_block: int = 2  # motion modules per down level; up levels have one more
    mid_block: bool = True
    heads: int = 8
    max_frames: int = 32  # length of the positional table `pos_encoder.pe`
    norm_groups: int = 32
    attention_blocks: int = 2  # temporal self-attentions per transformer block (SparseCtrl's modules have 1)

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"unknown AnimateDiff version {self.version!r}; expected one of {VERSIONS}")

    @classmethod
    def full(cls, version: str = "v2") -> "MotionModuleConfig":
        return cls(version=version, mid_block=version == "v2", max_frames=24 if version == "v1" else 32)

    @classmethod
    def tiny(cls, version: str = "v2") -> "MotionModuleConfig":
        return replace(cls.full(version), block_channels=(32, 64), layers_per_block=1, heads=2)

    @property
    def norm_across_frames(self) -> bool:
        return self.version == "v1"


# --------------------------------------------------------------------------- layers
def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """[1, length, dim] table: sin at even channels, cos at odd, frequencies 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, length, dim)
    table[0, :, 0::2] = torch.sin(position * freqs)
    table[0, :, 1::2] = torch.cos(position * freqs)
    return table


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_frames: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_table(max_frames, dim))  # persistent: the released files hold it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalAttention(Attention):
    """Self-attention along the frame axis, independently at every pixel."""

    def __init__(self, dim: int, heads: int, max_frames: int):
        super().__init__(dim, heads)
        self.pos_encoder = PositionalEncoding(dim, max_frames)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        bf, pixels, c = x.shape
        seq = x.reshape(bf // frames, frames, pixels, c).transpose(1, 2).reshape(-1, frames, c)
        out = super().forward(self.pos_encoder(seq))
        return out.reshape(bf // frames, pixels, frames, c).transpose(1, 2).reshape(bf, pixels, c)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_frames: int, attentions: int = 2):
        super().__init__()
        self.attention_blocks = nn.ModuleList(TemporalAttention(dim, heads, max_frames) for _ in range(attentions))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(attentions))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = x + attention(norm(x), frames)
        return x + self.ff(self.ff_norm(x))


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, max_frames: int, groups: int, attentions: int = 2):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(channels, heads, max_frames, attentions)])
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        """h [B*F, C, H, W] -> the temporal residual (same shape), without the input added back."""
        bf, c, height, width = h.shape
        x = self.proj_in(self.norm(h).permute(0, 2, 3, 1).reshape(bf, height * width, c))
        for block in self.transformer_blocks:
            x = block(x, frames)
        return self.proj_out(x).reshape(bf, height, width, c).permute(0, 3, 1, 2)


class TemporalModule(nn.Module):
    """One insertion point (`motion_modules.M`)."""

    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, config.heads, config.max_frames, config.norm_groups,
                                                        config.attention_blocks)

    def forward(self, h: torch.Tensor, frames: int, scale: float) -> torch.Tensor:
        if scale == 0.0:
            return h
        return h + scale * self.temporal_transformer(h, frames).to(h.dtype)


class _Stage(nn.Module):
    def __init__(self, channels: int, count: int, config: MotionModuleConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(TemporalModule(channels, config) for _ in range(count))


# --------------------------------------------------------------------------- the motion module set
class MotionModule(nn.Module):
    """All temporal modules of one checkpoint; implements the UNet's `TemporalHooks`.

    `scale` multiplies every temporal residual (motion strength: 0 gives the per-frame image model).
    """

    def __init__(self, config: MotionModuleConfig):
        super().__init__()
        self.config = c = config
        self.scale = 1.0
        self.down_blocks = nn.ModuleList(_Stage(ch, c.layers_per_block, c) for ch in c.block_channels)
        if c.mid_block:
            self.mid_block = _Stage(c.block_channels[-1], 1, c)
        self.up_blocks = nn.ModuleList(_Stage(ch, c.layers_per_block + 1, c) for ch in reversed(c.block_channels))

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        stages = [*self.down_blocks, *([self.mid_block] if self.config.mid_block else []), *self.up_blocks]
        return [module for stage in stages for module in stage.motion_modules]

    @property
    def norm_across_frames(self) -> bool:
        return self.config.norm_across_frames

    def _check_frames(self, frames: int) -> None:
        if frames > self.config.max_frames:
            raise ModelFileError(
                f"this AnimateDiff {self.config.version} motion module handles at most {self.config.max_frames} frames "
                f"at once (its positional table length), found {frames}; use context windows for longer videos"
            )

    def down(self, level: int, index: int, h: torch.Tensor, frames: int) -> torch.Tensor:
        self._check_frames(frames)
        return self.down_blocks[level].motion_modules[index](h, frames, self.scale)

    def mid(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        return self.mid_block.motion_modules[0](h, frames, self.scale) if self.config.mid_block else h

    def up(self, level: int, index: int, h: torch.Tensor, frames: int) -> torch.Tensor:
        return self.up_blocks[level].motion_modules[index](h, frames, self.scale)


class AnimateDiffUNet(nn.Module):
    """An SD1.5 UNet with a motion module: forward takes a batch of B*F frames and F."""

    def __init__(self, unet: SD15UNet, motion: MotionModule):
        super().__init__()
        self.unet = unet
        self.motion = motion

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, video_frames: int) -> torch.Tensor:
        return self.unet(x, timesteps, context, video_frames=video_frames, temporal=self.motion)


def check_compatible(unet: SD15UNet, motion: MotionModule) -> None:
    """Raise a clear error when the motion module was made for another UNet (e.g. SDXL, other widths)."""
    found = (tuple(motion.config.block_channels), motion.config.layers_per_block)
    expected = (tuple(unet.config.level_channels()), unet.config.num_res_blocks)
    if found != expected:
        raise ModelFileError(
            f"the motion module does not fit this UNet: it has channels {list(found[0])} with {found[1]} modules per "
            f"level, the UNet expects channels {list(expected[0])} with {expected[1]} resnets per level"
        )


def attach(unet: SD15UNet, motion: MotionModule) -> AnimateDiffUNet:
    check_compatible(unet, motion)
    return AnimateDiffUNet(unet, motion)


# --------------------------------------------------------------------------- checkpoints
def detect_version(shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> str:
    """v1 / v2 / v3 from a released motion module's names and shapes (raises for other files)."""
    det = checkpoints.detect({k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()})
    if det.family != "animatediff_motion_module":
        raise ModelFileError(f"expected an AnimateDiff SD1.5 motion module, found {det.describe()}")
    return det.version


def config_from_state_dict(shapes: Mapping[str, Sequence[int] | torch.Tensor], version: str | None = None,
                           heads: int = 8) -> MotionModuleConfig:
    """Architecture from internal-layout shapes. `version` defaults to the detected one (SD1.5 files only);
    the head count is not visible in shapes (AnimateDiff uses 8)."""
    shape = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    if version is None:
        version = detect_version(shape)
    levels = sorted({int(k.split(".")[1]) for k in shape if k.startswith("down_blocks.")})
    if not levels:
        raise ModelFileError("expected motion module tensors (down_blocks.N.motion_modules.M...), found none")
    per_level = 1 + max(int(k.split(".")[3]) for k in shape if k.startswith("down_blocks.0.motion_modules."))
    pe = next((v for k, v in shape.items() if k.endswith("pos_encoder.pe")), None)
    if pe is None:
        raise ModelFileError("expected `pos_encoder.pe` tables in the motion module (they fix its frame length), found none")
    proj = "down_blocks.{}.motion_modules.0.temporal_transformer.proj_in.weight"
    return MotionModuleConfig(
        version=version,
        block_channels=tuple(shape[proj.format(i)][0] for i in levels),
        layers_per_block=per_level,
        mid_block=any(k.startswith("mid_block.") for k in shape),
        heads=heads,
        max_frames=pe[1],
    )


_DIFFUSERS_BLOCK = {"attn1.": "attention_blocks.0.", "attn2.": "attention_blocks.1.",
                    "norm1.": "norms.0.", "norm2.": "norms.1.", "norm3.": "ff_norm."}


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: str, prefix: str = "",
                       attentions: int = 2) -> dict[str, torch.Tensor]:
    """`original` (released .ckpt/.safetensors) or `diffusers` (MotionAdapter) names -> internal names.

    diffusers keeps one `pos_embed.pe` per transformer block; the original gives each of the block's `attentions`
    temporal attentions its own copy.
    """
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if layout == "original":
        return {k: v for k, v in sd.items() if "motion_modules." in k}
    if layout != "diffusers":
        raise ModelFileError(f"unknown motion module key layout {layout!r}; expected 'original' or 'diffusers'")
    out = {}
    for key, value in sd.items():
        m = re.match(r"(.*?motion_modules\.\d+)\.(.*)$", key)
        if not m:
            continue  # e.g. the conv_in of a motion adapter with extra inputs
        head, rest = m.group(1), m.group(2)
        b = re.match(r"(transformer_blocks\.\d+)\.(.*)$", rest)
        if b and b.group(2) == "pos_embed.pe":
            for i in range(attentions):
                out[f"{head}.temporal_transformer.{b.group(1)}.attention_blocks.{i}.pos_encoder.pe"] = value
            continue
        if b:
            inner = b.group(2)
            for old, new in _DIFFUSERS_BLOCK.items():
                if inner.startswith(old):
                    inner = new + inner[len(old):]
                    break
            rest = f"{b.group(1)}.{inner}"
        out[f"{head}.temporal_transformer.{rest}"] = value
    return out


# --------------------------------------------------------------------------- LoRAs
def _lora_pairs(lora_sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`<module>.processor.<proj>_lora.{down,up}.weight` (diffusers attention-processor LoRA, as released by
    AnimateDiff) -> {"<module>.<proj>": (up, down)} with `to_out` spelled `to_out.0` like the model."""
    pairs = {}
    for key, down in lora_sd.items():
        if not key.endswith(".down.weight"):
            continue
        up_key = key[: -len(".down.weight")] + ".up.weight"
        if up_key not in lora_sd:
            raise ModelFileError(f"LoRA tensor {key!r} has no matching {up_key!r}")
        target = key[: -len(".down.weight")].replace("processor.", "")
        target = re.sub(r"(to_q|to_k|to_v|to_out)_lora$", r"\1", target)
        if target.endswith("to_out"):
            target += ".0"
        pairs[target] = (lora_sd[up_key], down)
    if not pairs:
        found = next(iter(lora_sd), "nothing")
        raise ModelFileError(f"expected LoRA tensors named '<layer>.processor.to_q_lora.down.weight' etc., found {found!r}")
    return pairs


def _merge(module: nn.Module, name: str, up: torch.Tensor, down: torch.Tensor, strength: float) -> None:
    try:
        layer = module.get_submodule(name)
    except AttributeError:
        raise ModelFileError(f"the LoRA targets {name!r}, which this model does not have") from None
    update, shape = (up.shape[0], down.shape[-1]), weights.linear_shape(layer)
    if up.shape[-1] != down.shape[0] or tuple(update) != shape:
        raise ModelFileError(f"the LoRA for {name!r} gives a {list(update)} update (up {list(up.shape)}, down "
                             f"{list(down.shape)}), the layer is {list(shape)}")
    weights.merge_lora(layer, up, down, strength)


def apply_motion_lora(module: MotionModule, lora_sd: Mapping[str, torch.Tensor], strength: float = 1.0) -> None:
    """Merge a motion LoRA into the motion module's attention projections, in place (W += strength * up @ down).

    Mid-block entries of a v2 LoRA are skipped on modules without a mid block, as the community loaders do.
    """
    pairs = _lora_pairs({k: v for k, v in lora_sd.items() if "temporal" in k})
    for name, (up, down) in pairs.items():
        if name.startswith("mid_block.") and not module.config.mid_block:
            continue
        _merge(module, name, up, down, strength)


def merge_unet_lora(unet: SD15UNet, lora_sd: Mapping[str, torch.Tensor], strength: float = 1.0) -> None:
    """Merge the AnimateDiff v3 domain adapter (a LoRA on the spatial attention layers, diffusers UNet names such
    as `down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight`) into the UNet."""
    c = unet.config
    levels = len(c.channel_mult)
    up_attention = {i for i in range(levels) if c.attention_levels[levels - 1 - i]}
    for name, (up, down) in _lora_pairs(lora_sd).items():
        name = name.removeprefix("unet.")
        target = diffusers_module_to_ldm(name, levels, c.num_res_blocks, up_attention)
        _merge(unet, target, up, down, strength)
