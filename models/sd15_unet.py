"""Stable Diffusion 1.5 UNet (the LDM "openaimodel" layout), with a seam for AnimateDiff motion modules.

Internal keys are the original LDM checkpoint names without the `model.diffusion_model.` prefix
(`input_blocks.N.M.*`, `middle_block.*`, `output_blocks.*`, `time_embed.*`, `out.*`), so a released
checkpoint loads after a prefix strip; diffusers `UNet2DConditionModel` names are converted to them.

Video: the UNet always runs on a batch of frames [B*F, C, H, W]. When `forward` gets `video_frames=F` and a
`TemporalHooks` object, it calls the hooks after every resnet/attention pair of the down and up path and
inside the middle block; that is where AnimateDiff inserts its temporal transformers. The UNet itself holds
no temporal state, so the same weights serve images and videos.

Control: `forward` also takes a control net's additional residuals (diffusers' `down_block_additional_residuals`
and `mid_block_additional_residual`): one tensor per skip connection, added to the skip as it is stored (the
down path itself runs on unchanged), and one added to the middle block's output (models/sparsectrl.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .attention import attend
from .caching import StepCacheHook

LDM_PREFIX = "model.diffusion_model."


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SD15UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # a SpatialTransformer after each resnet
    num_heads: int = 8
    context_dim: int = 768
    norm_groups: int = 32

    def __post_init__(self):
        if len(self.attention_levels) != len(self.channel_mult):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries, expected one per level ({len(self.channel_mult)})"
            )

    @classmethod
    def full(cls) -> "SD15UNetConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SD15UNetConfig":
        return cls(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                   num_heads=2, context_dim=32)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def level_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]


# --------------------------------------------------------------------------- motion module seam
class TemporalHooks(Protocol):
    """What the UNet calls while running a video. `h` is [B*F, C, H, W]; each call returns the same shape.

    `down(level, index, ...)` runs after resnet(+attention) `index` of down level `level`, before the skip is
    stored; `up(level, index, ...)` counts levels from the deepest (diffusers' `up_blocks` order) and runs
    before the upsampler; `mid` runs between the middle attention and the second middle resnet.
    `norm_across_frames` makes the resnet and output group norms share statistics over the frames of a video
    (AnimateDiff v1 was trained that way).
    """

    norm_across_frames: bool

    def down(self, level: int, index: int, h: torch.Tensor, frames: int) -> torch.Tensor: ...

    def mid(self, h: torch.Tensor, frames: int) -> torch.Tensor: ...

    def up(self, level: int, index: int, h: torch.Tensor, frames: int) -> torch.Tensor: ...


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
    """GroupNorm per image, or with statistics shared over each run of `frames` consecutive images."""
    if not frames or frames == 1:
        return norm(x)
    bf, c, h, w = x.shape
    video = x.reshape(bf // frames, frames, c, h, w).transpose(1, 2)
    out = F.group_norm(video, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return out.transpose(1, 2).reshape(bf, c, h, w)


# --------------------------------------------------------------------------- building blocks
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """LDM sinusoidal embedding: [cos(t*f), sin(t*f)] with f = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Attention(nn.Module):
    """Multi-head attention with `to_q/to_k/to_v` (no bias) and `to_out.0`; self-attention when context is None."""

    attention_backend = "sdpa"

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, dim = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, -1, self.heads, dim // self.heads).transpose(1, 2) for t in (q, k, v))
        out = attend(q, k, v, backend=self.attention_backend)
        return self.to_out(out.transpose(1, 2).reshape(b, n, dim))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with the LDM/diffusers names `net.0.proj` and `net.2` (4x inner width)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, norm_frames: int | None = None) -> torch.Tensor:
        h = self.in_layers[2](F.silu(group_norm(self.in_layers[0], x, norm_frames)))
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        h = self.out_layers[3](F.silu(group_norm(self.out_layers[0], h, norm_frames)))
        return self.skip_connection(x) + h


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv in -> transformer block(s) over H*W tokens -> 1x1 conv out, plus the residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# --------------------------------------------------------------------------- the UNet
class SD15UNet(nn.Module):
    def __init__(self, config: SD15UNetConfig):
        super().__init__()
        self.config = c = config
        mc, emb, groups = c.model_channels, c.time_embed_dim, c.norm_groups
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))

        def attention(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, c.num_heads, c.context_dim, groups)

        # input_blocks: conv_in, then per level `num_res_blocks` x [ResBlock (+attention)], then a downsampler
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(c.in_channels, mc, 3, padding=1)])])
        self._down_roles: list[tuple[int, int] | None] = [None]  # (level, index) for resnet blocks
        skip_channels, ch = [mc], mc
        levels = c.level_channels()
        for level, out_ch in enumerate(levels):
            for index in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb, out_ch, groups)]
                ch = out_ch
                if c.attention_levels[level]:
                    layers.append(attention(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                self._down_roles.append((level, index))
                skip_channels.append(ch)
            if level != len(levels) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                self._down_roles.append(None)
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([ResBlock(ch, emb, ch, groups), attention(ch), ResBlock(ch, emb, ch, groups)])

        # output_blocks: deepest level first, num_res_blocks+1 x [ResBlock(concat skip) (+attention)], upsampler last
        self.output_blocks = nn.ModuleList()
        self._up_roles: list[tuple[int, int]] = []
        for up_level, level in enumerate(reversed(range(len(levels)))):
            out_ch = levels[level]
            for index in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, out_ch, groups)]
                ch = out_ch
                if c.attention_levels[level]:
                    layers.append(attention(ch))
                if level != 0 and index == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))
                self._up_roles.append((up_level, index))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].weight.dtype

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def compile_blocks(self) -> list[nn.Module]:
        """The blocks runtime/acceleration.py compiles (one compilation per class, shared by its instances)."""
        return [m for m in self.modules() if isinstance(m, (ResBlock, SpatialTransformer))]

    def _attention(self, layers: nn.ModuleList, h, context) -> tuple[torch.Tensor, int]:
        """Run the attention after a block's resnet, if it has one; return h and the index of the next layer."""
        if len(layers) > 1 and isinstance(layers[1], SpatialTransformer):
            return layers[1](h, context), 2
        return h, 1

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        video_frames: int | None = None,
        temporal: TemporalHooks | None = None,
        step_cache: StepCacheHook | None = None,
        control: Callable[[], tuple[Sequence[torch.Tensor], torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """x [B*F, 4, H, W], timesteps [B*F], context [B*F, 77, 768] -> prediction [B*F, 4, H, W].

        Without `temporal` every image is independent; with it, `video_frames` consecutive images form a video.
        `step_cache` (models/caching.py, first-block cache): the probe is the residual of the first block, the resnet
        after conv_in (it costs a few percent of the UNet and its change tracks that of what follows it); a skip
        replaces everything from that block's attention up to the output layers.
        `control` gives a control net's additions (or None): `down_residuals`, one per skip connection (in order:
        conv_in, each resnet(+attention), each downsampler), and `mid_residual`, to the middle block's output. It is
        called only when the UNet runs past the step cache's decision, so a skipped step costs no control net.
        """
        if temporal is not None:
            if not video_frames or x.shape[0] % video_frames:
                raise ValueError(f"a batch of {x.shape[0]} frames cannot be split into videos of {video_frames} frames")
        frames = video_frames if temporal is not None else None
        norm_frames = frames if temporal is not None and temporal.norm_across_frames else None
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        h, context = x.to(dtype), context.to(dtype)

        skips, residual = [], None
        for index, (role, layers) in enumerate(zip(self._down_roles, self.input_blocks)):
            if role is None:  # conv_in or a downsampler
                h = layers[0](h)
            else:
                resnet_out = layers[0](h, emb, norm_frames)
                if index == 1 and step_cache is not None:  # the first resnet
                    first, probe = resnet_out, resnet_out - h
                    residual = step_cache.reuse(probe.unflatten(0, (-1, frames)) if frames else probe)
                    if residual is not None:
                        break
                h, _ = self._attention(layers, resnet_out, context)
                if temporal is not None:
                    h = temporal.down(role[0], role[1], h, frames)
            skips.append(h)

        if residual is None:
            residuals = control() if control is not None else None
            down_residuals, mid_residual = residuals if residuals is not None else (None, None)
            if down_residuals is not None:
                if len(down_residuals) != len(skips):
                    raise ValueError(f"expected {len(skips)} control residuals (one per skip connection), "
                                     f"got {len(down_residuals)}")
                skips = [skip + add.to(skip.dtype) for skip, add in zip(skips, down_residuals)]
            h = self.middle_block[0](h, emb, norm_frames)
            h = self.middle_block[1](h, context)
            if temporal is not None:
                h = temporal.mid(h, frames)
            h = self.middle_block[2](h, emb, norm_frames)
            if mid_residual is not None:
                h = h + mid_residual.to(h.dtype)

            for role, layers in zip(self._up_roles, self.output_blocks):
                h = torch.cat([h, skips.pop()], dim=1)
                h, next_layer = self._attention(layers, layers[0](h, emb, norm_frames), context)
                if temporal is not None:
                    h = temporal.up(role[0], role[1], h, frames)
                if next_layer < len(layers):
                    h = layers[next_layer](h)
            if step_cache is not None:
                step_cache.store(h - first)
        else:
            h = first + residual

        h = F.silu(group_norm(self.out[0], h, norm_frames))
        return self.out[2](h)


# --------------------------------------------------------------------------- checkpoints
def config_from_state_dict(shapes: Mapping[str, Sequence[int] | torch.Tensor], num_heads: int = 8) -> SD15UNetConfig:
    """Derive the architecture from internal-layout tensor shapes. Head count is not visible in shapes;
    SD1.x uses 8 heads."""
    shape = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    encoder = encoder_config(shape)
    if "out.2.weight" not in shape:
        raise ModelFileError("expected the SD UNet's output layer (out.2.weight), found none: is this a control net?")
    return SD15UNetConfig(out_channels=shape["out.2.weight"][0], num_heads=num_heads, **encoder)


def encoder_config(shape: Mapping[str, tuple[int, ...]]) -> dict:
    """The config fields the down path and middle block show in internal-layout shapes (`input_blocks.*`): input and
    model channels, channel multipliers, resnets per level, attention levels and text-context width. A control net
    (models/sparsectrl.py) has these layers only."""
    if "input_blocks.0.0.weight" not in shape:
        raise ModelFileError("expected SD UNet tensors (input_blocks.0.0.weight), found none: convert the keys first")
    mc, in_ch = shape["input_blocks.0.0.weight"][:2]
    blocks = sorted({int(k.split(".")[1]) for k in shape if k.startswith("input_blocks.")})
    level_channels: list[int] = []
    attention: list[bool] = []
    res_per_level: list[int] = [0]
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in shape:
            res_per_level.append(0)
            continue
        out_ch = shape[f"input_blocks.{n}.0.in_layers.2.weight"][0]
        if res_per_level[-1] == 0:
            level_channels.append(out_ch)
            attention.append(f"input_blocks.{n}.1.proj_in.weight" in shape)
        res_per_level[-1] += 1
    if len(set(res_per_level)) != 1:
        raise ModelFileError(f"expected the same number of resnets per UNet level, found {res_per_level}")
    context = next((v[1] for k, v in shape.items() if k.endswith("attn2.to_k.weight")), 768)
    return {"in_channels": in_ch, "model_channels": mc, "channel_mult": tuple(ch // mc for ch in level_channels),
            "num_res_blocks": res_per_level[0], "attention_levels": tuple(attention), "context_dim": context}


_DIFFUSERS_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_DIFFUSERS_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}


def _diffusers_block_sizes(keys: Sequence[str]) -> tuple[int, int, set[int]]:
    """(levels, resnets per down level, up levels that have attention) from diffusers UNet names."""
    levels = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("down_blocks."))
    per_level = 1 + max(int(k.split(".")[3]) for k in keys if k.startswith("down_blocks.0.resnets."))
    up_attn = {int(k.split(".")[1]) for k in keys if k.startswith("up_blocks.") and ".attentions." in k}
    return levels, per_level, up_attn


def diffusers_module_to_ldm(name: str, levels: int, per_level: int, up_attention: set[int]) -> str:
    """Map a diffusers UNet2DConditionModel module path (no parameter suffix) to its LDM path."""
    if name in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[name]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$", name)
    mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if mid:
        kind, j, rest = mid.group(1), int(mid.group(2)), mid.group(3)
        base = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    elif m:
        where, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if where == "down_blocks":
            block = 1 + i * (per_level + 1) + (per_level if kind == "downsamplers" else j)
            base = f"input_blocks.{block}." + {"resnets": "0", "attentions": "1", "downsamplers": "0"}[kind]
            if kind == "downsamplers":
                rest = "op" if rest == "conv" else rest
        else:
            block = i * (per_level + 1) + (per_level if kind == "upsamplers" else j)
            sub = {"resnets": "0", "attentions": "1", "upsamplers": "2" if i in up_attention else "1"}[kind]
            base = f"output_blocks.{block}.{sub}"
    else:
        raise ModelFileError(f"unexpected diffusers UNet tensor {name!r}: it maps to no SD1.5 UNet layer")
    if rest is None:
        return base
    if kind == "resnets":
        rest = _DIFFUSERS_RESNET.get(rest, rest)
    return f"{base}.{rest}"


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`ldm` (optionally under `model.diffusion_model.`) or `diffusers` names -> internal (LDM, no prefix)."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if layout == "ldm":
        if any(k.startswith(LDM_PREFIX) for k in sd):
            sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
        return dict(sd)
    if layout == "diffusers":
        levels, per_level, up_attention = _diffusers_block_sizes(list(sd))
        out = {}
        for key, value in sd.items():
            module, param = key.rsplit(".", 1)
            out[f"{diffusers_module_to_ldm(module, levels, per_level, up_attention)}.{param}"] = value
        return out
    raise ModelFileError(f"unknown SD1.5 UNet key layout {layout!r}; expected 'ldm' or 'diffusers'")
