"""Stable Diffusion KL-f8 VAE (SD1.x/2.x `first_stage_model`), with per-frame video helpers for AnimateDiff.

Internal keys are the original LDM names without `first_stage_model.` (`encoder.down.N.block.M.*`,
`decoder.up.N.*`, `quant_conv`, `post_quant_conv`, mid attention `mid.attn_1.{norm,q,k,v,proj_out}` as 1x1
convs). diffusers `AutoencoderKL` names (old `query/key/value/proj_attn` and new `to_q/.../to_out.0`
attention names, stored as linear weights) are converted to them.

Images are in -1..1. `encode`/`decode` work on unscaled latents; `encode_latents`/`decode_latents` and the
`*_frames` helpers use the sampler's scaled latents (x `scaling_factor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KineFlowError, ModelFileError
from .attention import attend
from .hunyuan_video_vae import LatentDistribution, least_squares_rgb

LDM_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class SDVAEConfig:
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def full(cls) -> "SDVAEConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SDVAEConfig":
        return cls(ch=32, ch_mult=(1, 2), num_res_blocks=1)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# --------------------------------------------------------------------------- blocks
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, projections as 1x1 convs (LDM naming)."""

    attention_backend = "sdpa"

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))
        out = attend(q, k, v, backend=self.attention_backend)[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (as the LDM VAE was trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: SDVAEConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = c.ch
        for level, mult in enumerate(c.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stage.block.append(ResnetBlock(ch, c.ch * mult, g))
                ch = c.ch * mult
            if level != len(c.ch_mult) - 1:
                stage.downsample = Downsample(ch)
            self.down.append(stage)
        self.mid = MidBlock(ch, g)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: SDVAEConfig):
        super().__init__()
        g = c.norm_groups
        ch = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, g)
        stages = []
        for level in reversed(range(len(c.ch_mult))):  # built deepest first, stored by level index (`up.N`)
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stage.block.append(ResnetBlock(ch, c.ch * c.ch_mult[level], g))
                ch = c.ch * c.ch_mult[level]
            if level != 0:
                stage.upsample = Upsample(ch)
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(ch, g)
        self.conv_out = nn.Conv2d(ch, c.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- the VAE
class SDVAE(nn.Module):
    def __init__(self, config: SDVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise KineFlowError(f"expected {what} [B, {channels}, H, W], found shape {list(x.shape)}")

    def encode(self, images: torch.Tensor) -> LatentDistribution:
        """images [B, 3, H, W] in -1..1 (H, W multiples of 8) -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        self._check(images, self.config.in_channels, "images")
        s = self.config.downscale
        if images.shape[-2] % s or images.shape[-1] % s:
            raise KineFlowError(f"image height and width must be multiples of {s}, found {images.shape[-2]}x{images.shape[-1]}")
        return LatentDistribution.from_moments(self.quant_conv(self.encoder(images.to(self.dtype))))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w] (float32, roughly -1..1)."""
        self._check(latents, self.config.z_channels, "latents")
        return self.decoder(self.post_quant_conv(latents.to(self.dtype))).float()

    def encode_latents(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in -1..1 -> scaled latents (posterior mean, or a sample)."""
        posterior = self.encode(images)
        return (posterior.sample(generator) if sample else posterior.mean) * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in -1..1 (clamped)."""
        return self.decode(latents / self.config.scaling_factor).clamp(-1.0, 1.0)

    def encode_frames(self, video: torch.Tensor, batch: int = 8, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in -1..1 -> scaled latents [B, 4, F, H/8, W/8], `batch` frames at a time."""
        if video.ndim != 5:
            raise KineFlowError(f"expected a video [B, 3, F, H, W], found shape {list(video.shape)}")
        frames = video.transpose(1, 2).flatten(0, 1)
        latents = torch.cat([self.encode_latents(frames[i : i + batch], sample, generator) for i in range(0, len(frames), max(1, batch))])
        return latents.unflatten(0, (video.shape[0], video.shape[2])).transpose(1, 2)

    def decode_frames(self, latents: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Scaled latents [B, 4, F, h, w] -> video [B, 3, F, 8h, 8w] in -1..1, decoding `batch` frames at a time
        so peak memory is bounded by the batch, not the clip length. Decoded frames are gathered in CPU memory
        (shapes-only `meta` latents give a `meta` video)."""
        if latents.ndim != 5:
            raise KineFlowError(f"expected video latents [B, 4, F, h, w], found shape {list(latents.shape)}")
        b, _, f, h, w = latents.shape
        flat = latents.transpose(1, 2).flatten(0, 1)
        out = torch.empty(b * f, self.config.in_channels, h * self.config.downscale, w * self.config.downscale,
                          device="meta" if latents.is_meta else "cpu")
        for i in range(0, len(flat), max(1, batch)):
            out[i : i + batch] = self.decode_latents(flat[i : i + batch]).to(out.device)
        return out.unflatten(0, (b, f)).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images).mean)


def fit_latent_rgb_factors(vae: SDVAE, images: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares linear map from *scaled* latents to RGB (-1..1) for cheap previews: (factors [4, 3], bias [3]).

    Each batch of images [N, 3, H, W] in -1..1 is encoded (posterior mean x scaling_factor); the target of a latent
    pixel is the mean colour of the image pixels it covers."""
    with torch.no_grad():
        return least_squares_rgb([(vae.encode_latents(x), F.avg_pool2d(x.float(), vae.config.downscale))
                                  for x in images])


# --------------------------------------------------------------------------- checkpoints
def config_from_state_dict(shapes: Mapping[str, Sequence[int] | torch.Tensor]) -> SDVAEConfig:
    """Derive the architecture from internal-layout tensor shapes."""
    shape = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in shapes.items()}
    if "encoder.conv_in.weight" not in shape or "decoder.conv_in.weight" not in shape:
        raise ModelFileError("expected SD VAE tensors (encoder.conv_in / decoder.conv_in), found none: convert the keys first")
    ch, in_ch = shape["encoder.conv_in.weight"][:2]
    levels = 1 + max(int(k.split(".")[2]) for k in shape if k.startswith("encoder.down."))
    mult = tuple(shape[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in shape if k.startswith("encoder.down.0.block."))
    return SDVAEConfig(in_channels=in_ch, ch=ch, ch_mult=mult, num_res_blocks=blocks,
                       z_channels=shape["decoder.conv_in.weight"][1])


_DIFFUSERS_ATTN = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}


def _diffusers_name(key: str, up_levels: int) -> str:
    m = re.match(r"(encoder|decoder)\.(.*)$", key)
    if not m:
        return key  # quant_conv, post_quant_conv
    part, rest = m.groups()
    rest = rest.replace("conv_norm_out", "norm_out").replace("mid_block.resnets.0", "mid.block_1")
    rest = rest.replace("mid_block.resnets.1", "mid.block_2")
    a = re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest)
    if a:
        rest = f"mid.attn_1.{_DIFFUSERS_ATTN.get(a.group(1), a.group(1))}.{a.group(2)}"
    rest = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", rest)
    rest = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", rest)
    rest = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda g: f"up.{up_levels - 1 - int(g.group(1))}.upsample.", rest)
    rest = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda g: f"up.{up_levels - 1 - int(g.group(1))}.block.", rest)
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    return f"{part}.{rest}"


def convert_state_dict(sd: Mapping[str, torch.Tensor], layout: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """`ldm` (optionally under `first_stage_model.`) or `diffusers` AutoencoderKL names -> internal names."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if layout == "ldm":
        if any(k.startswith(LDM_PREFIX) for k in sd):
            sd = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
        return dict(sd)
    if layout != "diffusers":
        raise ModelFileError(f"unknown SD VAE key layout {layout!r}; expected 'ldm' or 'diffusers'")
    up_levels = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")), default=-1)
    out = {}
    for key, value in sd.items():
        name = _diffusers_name(key, up_levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # diffusers stores the attention projections as linear layers
        out[name] = value
    return out
