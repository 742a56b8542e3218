"""HunyuanVideo causal 3D VAE (the "884-16c-hy" autoencoder), in one file.

Shape contract
    video   [B, 3, F, H, W] in -1..1, F = 1 + 4k, H and W multiples of 8
    latents [B, 16, k + 1, H / 8, W / 8]
The first frame is encoded on its own (like an image); every later latent frame covers 4 video frames.
All convolutions are causal in time: the temporal padding (kernel - 1 frames) is put in front of the clip
by replicating the first frame, so frame t never sees frames after t. The mid-block attention is causal
across frames too: a token attends to every token of its own frame and of earlier frames.

Key layout: the module tree uses the original Tencent names (`hyvideo/vae`), which are also diffusers'
`AutoencoderKLHunyuanVideo` names; ComfyUI's layout is converted by `convert_state_dict`.

Scaling: `encode`/`decode` work on *unscaled* latents (the raw posterior). The sampling pipeline works on
latents multiplied by `config.scaling_factor`; `encode_latents`/`decode_latents` apply that factor.

Tiling: `encode`/`decode` accept a `TilingOptions` (or "auto" plus a memory budget). Tiles overlap in space
and time and are blended linearly over the overlap. A temporal tile that does not start at frame 0 is fed
one extra leading latent (decode) or video frame (encode) so that its causal start-up frame is computed and
then dropped, the way upstream's temporal tiling does it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KineFlowError, ModelFileError
from .attention import attend
from .tiling import share_tiles, tiling_problem

HUNYUAN_VAE_SCALING_FACTOR = 0.476986
Layout = Literal["original", "diffusers", "comfy"]
ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HunyuanVideoVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # resnets per encoder block; decoder blocks have one more
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    scaling_factor: float = HUNYUAN_VAE_SCALING_FACTOR

    def __post_init__(self):
        blocks = len(self.block_out_channels)
        for name, ratio in (("spatial", self.spatial_compression_ratio), ("temporal", self.temporal_compression_ratio)):
            steps = int(math.log2(ratio)) if ratio >= 1 else -1
            if 2**steps != ratio or steps > blocks - 1:
                raise ValueError(
                    f"{name}_compression_ratio must be a power of two reachable with {blocks - 1} downsampling "
                    f"blocks (at most {2 ** (blocks - 1)}); found {ratio}"
                )
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ValueError(
                    f"every block width must be divisible by norm_num_groups={self.norm_num_groups}; "
                    f"found block_out_channels={self.block_out_channels}"
                )

    @classmethod
    def full(cls) -> "HunyuanVideoVAEConfig":
        """The released HunyuanVideo VAE (hunyuan-video-t2v-720p/vae, 246.5 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "HunyuanVideoVAEConfig":
        """Small widths, same block structure and the same 4x time / 8x space compression.

        4 norm groups: with the full model's 32 groups a 16-wide block would normalise every channel on its
        own, erasing the per-channel means that carry flat colours (it then barely learns). Shapes do not record
        the group count, so files of this config carry it in their metadata (`norm_num_groups`), as they carry
        the scaling factor the trainer measures.
        """
        return cls(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=4)

    def spatial_downsample_blocks(self) -> int:
        return int(math.log2(self.spatial_compression_ratio))

    def block_strides(self, index: int) -> tuple[int, int]:
        """(time, space) factor of encoder block `index` (decoder block `index` counts from the bottom).

        Space is halved in the first log2(spatial) blocks, time in the log2(temporal) blocks just before the
        last one; for 4 blocks, 4x/8x this is upstream's choice (space in blocks 0-2, time in blocks 1-2).
        """
        last = len(self.block_out_channels) - 1
        time_steps = int(math.log2(self.temporal_compression_ratio))
        space = 2 if index < self.spatial_downsample_blocks() else 1
        time = 2 if last - time_steps <= index < last else 1
        return time, space


def default_norm_groups(block_out_channels: Sequence[int]) -> int:
    """32 groups (upstream) unless a block width forbids it: then the largest common divisor below 32."""
    return math.gcd(32, *block_out_channels)


# --------------------------------------------------------------------------- layers
class CausalConv3d(nn.Module):
    """Conv3d whose temporal padding is all in front (replicating the first frame); space is padded evenly."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1):
        super().__init__()
        half = kernel_size // 2
        # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        self.padding = (half, half, half, half, kernel_size - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Strided causal conv; with time stride 2, F frames become (F - 1) // 2 + 1 (1 + 2k -> 1 + k)."""

    def __init__(self, channels: int, time_stride: int, space_stride: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(time_stride, space_stride, space_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling then a causal conv. In time the first frame stays single: T -> 1 + 2 (T - 1)."""

    def __init__(self, channels: int, time_factor: int, space_factor: int):
        super().__init__()
        self.time_factor = time_factor
        self.space_factor = space_factor
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_factor > 1:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(self.time_factor, dim=2)], dim=2)
        if self.space_factor > 1:
            x = F.interpolate(x, scale_factor=(1, self.space_factor, self.space_factor), mode="nearest")
        return self.conv(x)


class CausalFrameAttention(nn.Module):
    """Single-head self-attention over all voxels; a query sees its own frame and earlier frames only.

    Computed frame by frame (queries of frame t against keys of frames 0..t), which is the same as a
    block-causal mask but never builds the [N, N] mask.
    """

    attention_backend = "sdpa"

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Sequential(nn.Linear(channels, channels))  # index 0 kept for the checkpoint names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(batch, frames * height * width, channels)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        per_frame = height * width
        out = torch.empty_like(q)
        for t in range(frames):
            rows = slice(t * per_frame, (t + 1) * per_frame)
            visible = (t + 1) * per_frame
            out[:, rows] = attend(q[:, None, rows], k[:, None, :visible], v[:, None, :visible],
                                  backend=self.attention_backend)[:, 0]
        out = self.to_out(out).reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalFrameAttention(channels, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, time: int, space: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        resamples = time > 1 or space > 1
        self.downsamplers = nn.ModuleList([Downsample(out_channels, time, space)]) if resamples else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, time: int, space: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)]
        )
        resamples = time > 1 or space > 1
        self.upsamplers = nn.ModuleList([Upsample(out_channels, time, space)]) if resamples else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, widths[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, *config.block_strides(i))
            for i in range(len(widths))
        )
        self.mid_block = MidBlock(widths[-1], groups, config.mid_block_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups
        last = len(widths) - 1
        self.conv_in = CausalConv3d(config.latent_channels, widths[0])
        self.mid_block = MidBlock(widths[0], groups, config.mid_block_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, *config.block_strides(i)
            )
            for i in range(last + 1)
        )
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=1e-6)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- posterior
@dataclass
class LatentDistribution:
    """Diagonal Gaussian posterior over unscaled latents [B, C, T, h, w] (float32)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "LatentDistribution":
        mean, logvar = moments.float().chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws noise on the generator's device (CPU by default) in float32, then moves it to the mean."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device)


# --------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class TilingOptions:
    """Tile sizes in video units: pixels in space, frames in time (not counting a tile's causal lead-in frame).

    Sizes and overlaps must be multiples of the compression ratios (8 px, 4 frames) and overlap at most half
    a tile. Defaults are upstream's (256 px tiles with 64 px overlap, 16-frame tiles with 4 frames overlap).
    """

    tile_size: int = 256
    tile_overlap: int = 64
    tile_frames: int = 16
    frame_overlap: int = 4

    def check(self, config: HunyuanVideoVAEConfig) -> None:
        problem = tiling_problem(self.tile_size, self.tile_overlap, self.tile_frames, self.frame_overlap,
                                 config.spatial_compression_ratio, config.temporal_compression_ratio)
        if problem:
            raise KineFlowError(problem)


@dataclass(frozen=True)
class _Span:
    """A tile along one axis: [start, end) plus how much it shares with the previous (lead) and next (trail) tile."""

    start: int
    end: int
    lead: int
    trail: int


def _spans(length: int, tile: int, overlap: int) -> list[_Span]:
    """Cover [0, length) with windows of `tile` stepping by tile - overlap.

    Consecutive windows share exactly `overlap` units and the last window is cut at `length`, so it is
    shorter but still longer than the overlap. length 0 gives one empty window (a lone first frame).
    """
    if length <= tile:
        return [_Span(0, length, 0, 0)]
    bounds = []
    start = 0
    while True:
        end = min(start + tile, length)
        bounds.append((start, end))
        if end == length:
            break
        start += tile - overlap
    return [
        _Span(a, b, overlap if i > 0 else 0, overlap if i < len(bounds) - 1 else 0) for i, (a, b) in enumerate(bounds)
    ]


def _blend_weights(length: int, lead: int, trail: int) -> torch.Tensor:
    """1 inside, linear ramps over the overlaps; a ramp down and the next tile's ramp up sum to exactly 1."""
    weights = torch.ones(length)
    if lead:
        weights[:lead] = torch.arange(1, lead + 1) / (lead + 1)
    if trail:
        weights[length - trail :] = torch.arange(trail, 0, -1) / (trail + 1)
    return weights


def estimate_peak_bytes(
    config: HunyuanVideoVAEConfig, frames: int, height: int, width: int, bytes_per_element: int = 4, batch: int = 1
) -> int:
    """Rough peak activation memory of one decoder pass over a video of this size (weights not included).

    Counts, for every resolution stage, the widest activation times 5 live copies (input kept as residual,
    normalised, activated, padded, conv output) and the last frame's attention scores. Against measured CPU
    peaks (benchmarks/bench_vae_tiling.py: 686 MiB untiled, 160 MiB per 128 px tile) it gives 720 and
    180 MiB. The encoder needs no more than the decoder, so encode uses the same estimate.
    """
    widths = config.block_out_channels[::-1]  # decoder order, from the latent resolution upwards
    s, r = config.spatial_compression_ratio, config.temporal_compression_ratio
    latent_t, latent_h, latent_w = (frames - 1) // r + 1, height // s, width // s
    tokens = latent_t * latent_h * latent_w
    peak = (latent_h * latent_w) * tokens + 4 * widths[0] * tokens  # last frame's scores + q, k, v, out
    t, h, w = latent_t, latent_h, latent_w
    for index, width in enumerate(widths):
        # each block's resnets run at its input resolution; its upsampled output is counted by the next block
        peak = max(peak, 5 * max(widths[max(index - 1, 0)], width) * t * h * w)
        time, space = config.block_strides(index)
        t, h, w = 1 + time * (t - 1), h * space, w * space
    return batch * bytes_per_element * peak


def auto_tiling(
    config: HunyuanVideoVAEConfig,
    frames: int,
    height: int,
    width: int,
    memory_budget_bytes: int,
    bytes_per_element: int = 4,
    batch: int = 1,
) -> TilingOptions | None:
    """The largest tiles whose estimated peak (plus the float32 output buffer) fits the budget.

    Returns None when the whole video fits untiled. Long temporal tiles are kept before large spatial ones;
    when nothing fits, the smallest candidate (64 px, 4 frames) is returned as the best effort.
    """
    if estimate_peak_bytes(config, frames, height, width, bytes_per_element, batch) <= memory_budget_bytes:
        return None
    s, r = config.spatial_compression_ratio, config.temporal_compression_ratio
    output_bytes = 4 * batch * max(config.out_channels, 2 * config.latent_channels) * frames * height * width
    whole_frames, whole_size = max(r, frames - 1), max(height, width)
    temporal = [whole_frames] + [n for n in (32, 16, 8, 4) if n < whole_frames and n % r == 0]
    spatial = [whole_size] + [n for n in (768, 512, 384, 256, 192, 128, 96, 64) if n < whole_size and n % s == 0]
    options = None
    for tile_frames in temporal:
        for tile_size in spatial:
            options = TilingOptions(
                tile_size=tile_size,
                tile_overlap=(tile_size // 4) // s * s,
                tile_frames=tile_frames,
                frame_overlap=r if tile_frames < whole_frames else 0,
            )
            tile_peak = estimate_peak_bytes(
                config, tile_frames + 1, min(tile_size, height), min(tile_size, width), bytes_per_element, batch
            )
            if tile_peak + output_bytes <= memory_budget_bytes:
                return options
    return options


# --------------------------------------------------------------------------- model
class HunyuanVideoVAE(nn.Module):
    def __init__(self, config: HunyuanVideoVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)

    # ---- shape arithmetic
    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.config.temporal_compression_ratio + 1

    def video_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.config.temporal_compression_ratio + 1

    def _plan(self, tiling, memory_budget_bytes, batch, chunks, rows, cols) -> tuple[list[_Span], ...]:
        """Tiles over the 4-frame chunks after frame 0 and over latent rows / columns."""
        s, r = self.config.spatial_compression_ratio, self.config.temporal_compression_ratio
        if isinstance(tiling, str):
            if tiling != "auto" or memory_budget_bytes is None:
                raise KineFlowError(
                    f"tiling must be None, TilingOptions or 'auto' with memory_budget_bytes; "
                    f"found {tiling!r} with budget {memory_budget_bytes}"
                )
            frames, height, width = 1 + r * chunks, s * rows, s * cols
            tiling = auto_tiling(self.config, frames, height, width, memory_budget_bytes, self.dtype.itemsize, batch)
        if tiling is None:
            return [_Span(0, chunks, 0, 0)], [_Span(0, rows, 0, 0)], [_Span(0, cols, 0, 0)]
        tiling.check(self.config)
        return (
            _spans(chunks, tiling.tile_frames // r, tiling.frame_overlap // r),
            _spans(rows, tiling.tile_size // s, tiling.tile_overlap // s),
            _spans(cols, tiling.tile_size // s, tiling.tile_overlap // s),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    # ---- encode
    def encode(
        self,
        video: torch.Tensor,
        tiling: TilingOptions | Literal["auto"] | None = None,
        memory_budget_bytes: int | None = None,
        callback: ProgressCallback | None = None,
    ) -> LatentDistribution:
        """video [B, 3, 1+4k, H, W] in -1..1 -> posterior over unscaled latents [B, 16, k+1, H/8, W/8]."""
        batch, channels, frames, height, width = self._check_video(video)
        s, r = self.config.spatial_compression_ratio, self.config.temporal_compression_ratio
        chunks = (frames - 1) // r
        time_spans, row_spans, col_spans = self._plan(tiling, memory_budget_bytes, batch, chunks, height // s, width // s)
        video = video.to(self.dtype)
        total = len(time_spans) * len(row_spans) * len(col_spans)
        if total == 1:
            moments = self.quant_conv(self.encoder(video))
            if callback is not None:
                callback(1, 1)
            return LatentDistribution.from_moments(moments)

        moments = torch.zeros(
            batch, 2 * self.config.latent_channels, chunks + 1, height // s, width // s, device=video.device
        )
        done = 0
        for ts in time_spans:
            # chunks [a, b) are video frames 1+4a .. 4b; frame 4a in front is frame 0 (kept) or a causal lead-in
            clip = video[:, :, r * ts.start : 1 + r * ts.end]
            first = 0 if ts.start == 0 else 1
            out_t0 = 0 if ts.start == 0 else 1 + ts.start
            time_weights = _blend_weights(1 + ts.end - out_t0, ts.lead, ts.trail)
            for rs in row_spans:
                for cs in col_spans:
                    tile = clip[:, :, :, s * rs.start : s * rs.end, s * cs.start : s * cs.end]
                    encoded = self.quant_conv(self.encoder(tile))[:, :, first:].float()
                    weights = self._tile_weights(time_weights, rs, cs, encoded.device)
                    moments[:, :, out_t0 : 1 + ts.end, rs.start : rs.end, cs.start : cs.end] += encoded * weights
                    done += 1
                    if callback is not None:
                        callback(done, total)
        return LatentDistribution.from_moments(moments)

    # ---- decode
    def decode(
        self,
        latents: torch.Tensor,
        tiling: TilingOptions | Literal["auto"] | None = None,
        memory_budget_bytes: int | None = None,
        callback: ProgressCallback | None = None,
        group=None,
    ) -> torch.Tensor:
        """Unscaled latents [B, 16, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] (float32, roughly -1..1).

        `group`, a torch.distributed process group, shares the tiles out over its ranks (`share_tiles`); every rank
        returns the whole video, the same bit for bit as one process decodes it."""
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise KineFlowError(
                f"expected latents [B, {self.config.latent_channels}, T, h, w]; found shape {tuple(latents.shape)}"
            )
        batch, _, latent_t, latent_h, latent_w = latents.shape
        s, r = self.config.spatial_compression_ratio, self.config.temporal_compression_ratio
        frames = self.video_frames(latent_t)
        # time is tiled over the 4-frame chunks that follow latent frame 0 (chunk c is latent c + 1)
        time_spans, row_spans, col_spans = self._plan(tiling, memory_budget_bytes, batch, latent_t - 1, latent_h, latent_w)
        latents = latents.to(self.dtype)
        total = len(time_spans) * len(row_spans) * len(col_spans)
        if total == 1:
            video = self.decoder(self.post_quant_conv(latents)).float()
            if callback is not None:
                callback(1, 1)
            return video

        video = torch.zeros(batch, self.config.out_channels, frames, s * latent_h, s * latent_w, device=latents.device)
        tiles = []
        for ts in time_spans:
            # latent frames ts.start .. ts.end: latent ts.start is frame 0 (kept) or a causal lead-in (dropped)
            first = 0 if ts.start == 0 else 1
            out_f0 = 0 if ts.start == 0 else 1 + r * ts.start
            out_f1 = 1 + r * ts.end
            time_weights = _blend_weights(out_f1 - out_f0, r * ts.lead, r * ts.trail)
            tiles += [(ts, first, out_f0, out_f1, time_weights, rs, cs) for rs in row_spans for cs in col_spans]

        def run(tile):
            ts, first, _, _, _, rs, cs = tile
            clip = self.post_quant_conv(latents[:, :, ts.start : ts.end + 1, rs.start : rs.end, cs.start : cs.end])
            return self.decoder(clip)[:, :, first:].float()

        def shape(tile):
            _, _, out_f0, out_f1, _, rs, cs = tile
            return (batch, self.config.out_channels, out_f1 - out_f0, s * (rs.end - rs.start), s * (cs.end - cs.start))

        results = ((tile, run(tile)) for tile in tiles) if group is None else share_tiles(
            tiles, run, shape, group, latents.device)
        for done, (tile, decoded) in enumerate(results, start=1):
            _, _, out_f0, out_f1, time_weights, rs, cs = tile
            weights = self._tile_weights(
                time_weights,
                _Span(s * rs.start, s * rs.end, s * rs.lead, s * rs.trail),
                _Span(s * cs.start, s * cs.end, s * cs.lead, s * cs.trail),
                decoded.device,
            )
            video[:, :, out_f0:out_f1, s * rs.start : s * rs.end, s * cs.start : s * cs.end] += decoded * weights
            if callback is not None:
                callback(done, len(tiles))
        return video

    @staticmethod
    def _tile_weights(time_weights: torch.Tensor, rows: _Span, cols: _Span, device) -> torch.Tensor:
        row_weights = _blend_weights(rows.end - rows.start, rows.lead, rows.trail)
        col_weights = _blend_weights(cols.end - cols.start, cols.lead, cols.trail)
        weights = time_weights[:, None, None] * row_weights[None, :, None] * col_weights[None, None, :]
        return weights.to(device)

    def _check_video(self, video: torch.Tensor) -> tuple[int, ...]:
        s, r = self.config.spatial_compression_ratio, self.config.temporal_compression_ratio
        if video.ndim != 5 or video.shape[1] != self.config.in_channels:
            raise KineFlowError(
                f"expected a video tensor [B, {self.config.in_channels}, F, H, W]; found shape {tuple(video.shape)}"
            )
        _, _, frames, height, width = video.shape
        if (frames - 1) % r or height % s or width % s:
            raise KineFlowError(
                f"the VAE needs 1 + {r}k frames and a size that is a multiple of {s}; "
                f"found {frames} frames of {width}x{height}"
            )
        return tuple(video.shape)

    # ---- pipeline helpers (scaled latents)
    def encode_latents(
        self,
        video: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        **encode_options,
    ) -> torch.Tensor:
        """Video in -1..1 -> latents as the sampler sees them (posterior mean, or a sample, x scaling_factor)."""
        posterior = self.encode(video, **encode_options)
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, **decode_options) -> torch.Tensor:
        """Sampler latents (scaled) -> video in -1..1 (clamped)."""
        return self.decode(latents / self.config.scaling_factor, **decode_options).clamp(-1.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean (used by training)."""
        return self.decode(self.encode(video).mean)


# --------------------------------------------------------------------------- latent previews
def latent_frame_targets(video: torch.Tensor, config: HunyuanVideoVAEConfig) -> torch.Tensor:
    """Mean colour of the video voxels each latent covers: [B, 3, 1+4k, H, W] -> [B, 3, k+1, H/8, W/8]."""
    s, r = config.spatial_compression_ratio, config.temporal_compression_ratio
    first = video[:, :, :1]
    rest = video[:, :, 1:]
    if rest.shape[2]:
        b, c, f, h, w = rest.shape
        rest = rest.reshape(b, c, f // r, r, h, w).mean(dim=3)
        first = torch.cat([first, rest], dim=2)
    return F.avg_pool3d(first, kernel_size=(1, s, s))


def fit_latent_rgb_factors(
    vae: HunyuanVideoVAE, videos: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares linear map from *scaled* latents to RGB (-1..1) for cheap previews.

    Each video [B, 3, 1+4k, H, W] is encoded (posterior mean x scaling_factor); the target for a latent
    voxel is the mean colour of the video voxels it covers. Returns (factors [C, 3], bias [3]) such that
    rgb ~= latents^T @ factors + bias.
    """
    pairs = []
    with torch.no_grad():
        for video in videos:
            pairs.append((vae.encode_latents(video), latent_frame_targets(video.float(), vae.config)))
    return least_squares_rgb(pairs)


def least_squares_rgb(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(factors [C, 3], bias [3]) minimising |latent^T @ factors + bias - colour|^2 over every latent pixel of the
    (latents [B, C, ...], colours [B, 3, ...]) pairs, colours in -1..1."""
    features, targets = [], []
    for latents, colours in pairs:
        features.append(latents.movedim(1, -1).reshape(-1, latents.shape[1]))
        targets.append(colours.movedim(1, -1).reshape(-1, colours.shape[1]))
    x = torch.cat(features).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(x, torch.cat(targets).double()).solution
    return solution[:-1].float(), solution[-1].float()


def latents_to_rgb_preview(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Scaled latents [C, T, h, w] -> preview frames [T, h, w, 3] in 0..1."""
    rgb = torch.einsum("cthw,cr->thwr", latents.float(), factors.to(latents.device)) + bias.to(latents.device)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- checkpoints
# ComfyUI layout (comfy/ldm/modules/diffusionmodules/model.py built with conv3d=True): encoder.down.N.block.M,
# .downsample, decoder.up.N (N counted from the output end, i.e. reversed), mid.block_1/attn_1/block_2,
# norm_out, nin_shortcut; attention q/k/v/proj_out stored as 1x1x1 conv kernels [C, C, 1, 1, 1].
_COMFY_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_COMFY_ATTENTION_PROJECTIONS = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def _strip_prefix(keys: Iterable[str]) -> tuple[str, list[str]]:
    """Upstream's loader also accepts keys saved under 'vae.' (hyvideo/vae/__init__.py); drop that prefix."""
    keys = list(keys)
    if keys and all(k.startswith("vae.") for k in keys):
        return "vae.", [k[4:] for k in keys]
    return "", keys


def detect_layout(keys: Iterable[str]) -> Layout | None:
    """'original' or 'comfy' for a HunyuanVideo VAE key set, None for anything else.

    The original Tencent file and diffusers' AutoencoderKLHunyuanVideo have identical keys and shapes
    (diffusers' converter renames nothing), so nothing distinguishes them: such files are reported as
    'original'. "diffusers" is accepted by convert_state_dict but never returned here.
    """
    _, keys = _strip_prefix(keys)
    keys = set(keys)
    if "decoder.conv_in.conv.weight" not in keys or "post_quant_conv.weight" not in keys:
        return None  # a 2D VAE has decoder.conv_in.weight; the causal 3D conv wraps it as .conv
    if "decoder.conv_norm_out.weight" in keys and any(k.startswith("decoder.up_blocks.") for k in keys):
        return "original"
    if "decoder.norm_out.weight" in keys and any(k.startswith("decoder.up.") for k in keys):
        return "comfy"
    return None


def _comfy_to_internal(key: str, up_blocks: int) -> str:
    parts = key.split(".")
    if len(parts) < 3:
        return key  # quant_conv.*, post_quant_conv.*
    side, group = parts[0], parts[1]
    if group in ("down", "up"):  # {encoder.down|decoder.up}.N.{block.M|downsample|upsample}.*
        index = int(parts[2]) if group == "down" else up_blocks - 1 - int(parts[2])  # comfy counts up from the output
        blocks = "down_blocks" if group == "down" else "up_blocks"
        if parts[3] == "block":
            rest = ["conv_shortcut" if p == "nin_shortcut" else p for p in parts[5:]]
            return ".".join([side, blocks, str(index), "resnets", parts[4], *rest])
        resampler = {"downsample": "downsamplers", "upsample": "upsamplers"}[parts[3]]
        return ".".join([side, blocks, str(index), resampler, "0", *parts[4:]])
    if group == "mid":
        if parts[2] == "attn_1":
            return ".".join([side, "mid_block", "attentions", "0", _COMFY_ATTENTION[parts[3]], *parts[4:]])
        resnet = {"block_1": "0", "block_2": "1"}[parts[2]]
        return ".".join([side, "mid_block", "resnets", resnet, *parts[3:]])
    if group == "norm_out":
        return ".".join([side, "conv_norm_out", *parts[2:]])
    return key


def _internal_names(keys: Sequence[str], layout: str) -> dict[str, str]:
    """Map each source key to its internal name for the given layout."""
    if layout not in ("original", "diffusers", "comfy"):
        raise ValueError(f"unknown HunyuanVideo VAE layout {layout!r}; expected 'original', 'diffusers' or 'comfy'")
    prefix, stripped = _strip_prefix(keys)
    if layout != "comfy":
        return {prefix + k: k for k in stripped}
    up_indices = {int(k.split(".")[2]) for k in stripped if k.startswith("decoder.up.")}
    try:
        return {prefix + k: _comfy_to_internal(k, len(up_indices)) for k in stripped}
    except (KeyError, IndexError, ValueError) as error:
        raise ModelFileError(f"unexpected key in a ComfyUI-layout HunyuanVideo VAE ({error!r})") from error


def _is_attention_projection(name: str) -> bool:
    return ".mid_block.attentions." in name and name.endswith(_COMFY_ATTENTION_PROJECTIONS)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Any supported layout -> internal (original) names; ComfyUI's 1x1x1 attention kernels become [C, C]."""
    names = _internal_names(list(state_dict), layout)
    converted = {}
    for key, tensor in state_dict.items():
        name = names[key]
        if layout == "comfy" and _is_attention_projection(name) and tensor.ndim == 5:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        converted[name] = tensor
    return converted


def config_from_state_dict(
    shapes: Mapping[str, Sequence[int] | torch.Tensor], scaling_factor: float = HUNYUAN_VAE_SCALING_FACTOR
) -> HunyuanVideoVAEConfig:
    """Build the config from tensor shapes (or tensors) of any supported layout.

    Shapes do not record norm_num_groups (taken as `default_norm_groups`), the scaling factor (a parameter)
    or the temporal compression (taken as 4, the only ratio HunyuanVideo's decoder supports).
    """
    layout = detect_layout(shapes)
    if layout is None:
        raise ModelFileError(
            "expected a HunyuanVideo causal 3D VAE (keys like decoder.conv_in.conv.weight and "
            "decoder.conv_norm_out.weight or decoder.norm_out.weight); found none of them"
        )
    names = _internal_names(list(shapes), layout)
    internal = {names[k]: tuple(v.shape if isinstance(v, torch.Tensor) else v) for k, v in shapes.items()}
    blocks = sorted({int(k.split(".")[2]) for k in internal if k.startswith("encoder.down_blocks.")})
    widths = tuple(internal[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"][0] for i in blocks)
    layers = len({k.split(".")[4] for k in internal if k.startswith("encoder.down_blocks.0.resnets.")})
    # strides are not stored; every released config halves space in each block that has a downsampler
    downsampling = sum(f"encoder.down_blocks.{i}.downsamplers.0.conv.conv.weight" in internal for i in blocks)
    return HunyuanVideoVAEConfig(
        in_channels=internal["encoder.conv_in.conv.weight"][1],
        out_channels=internal["decoder.conv_out.conv.weight"][0],
        latent_channels=internal["post_quant_conv.weight"][0],
        block_out_channels=widths,
        layers_per_block=layers,
        norm_num_groups=default_norm_groups(widths),
        mid_block_attention="encoder.mid_block.attentions.0.to_q.weight" in internal,
        spatial_compression_ratio=2**downsampling,
        temporal_compression_ratio=4,
        scaling_factor=scaling_factor,
    )
