"""How each family's latents relate to pixels, and the video sizes that fit them.

Plain Python, so that Empty Video Latent offers and checks its inputs without importing torch (the node registry
loads on every `kineflow` command).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LatentFormat:
    """How a family's latents relate to pixels."""

    name: str
    channels: int
    temporal_ratio: int  # video frames per latent frame after the first (1 = per-frame latents)
    spatial_ratio: int
    frame_multiple: int = 1  # frames must be 1 + k*frame_multiple (4 for the causal 3D VAE)
    size_multiple: int = 16

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
        t = (frames - 1) // self.temporal_ratio + 1 if self.temporal_ratio > 1 else frames
        return (batch, self.channels, t, height // self.spatial_ratio, width // self.spatial_ratio)

    def video_frames(self, latent_frames: int) -> int:
        return (latent_frames - 1) * self.temporal_ratio + 1 if self.temporal_ratio > 1 else latent_frames


HUNYUAN_VIDEO_LATENT = LatentFormat("hunyuan_video", 16, 4, 8, frame_multiple=4)
SD15_LATENT = LatentFormat("sd15", 4, 1, 8)
LATENT_FORMATS = {f.name: f for f in (HUNYUAN_VIDEO_LATENT, SD15_LATENT)}

# Image To Video's modes: "auto" conditions the way the model's file says (latent concat for 32/33 input channels);
# "token_replace" for HunyuanVideo-I2V's token-replace release, whose 16-channel file looks like text to video.
IMAGE_CONDITION_MODES = ("auto", "token_replace")


def nearest_valid_size(fmt: LatentFormat, width: int, height: int, frames: int) -> tuple[int, int, int]:
    m, f = fmt.size_multiple, fmt.frame_multiple
    snap = lambda v: max(m, int(round(v / m)) * m)  # noqa: E731
    return snap(width), snap(height), max(1, int(round((frames - 1) / f)) * f + 1)


def check_video_size(format_name: str, width: int, height: int, frames: int) -> str | None:
    """None if the size fits the latent format, else a message naming the nearest valid values."""
    fmt = LATENT_FORMATS[format_name]
    w, h, n = nearest_valid_size(fmt, width, height, frames)
    problems = []
    if (w, h) != (width, height):
        problems.append(f"width and height must be multiples of {fmt.size_multiple} (got {width}x{height}; nearest valid: {w}x{h})")
    if n != frames:
        problems.append(f"frames must be 1 + {fmt.frame_multiple}k for {format_name} (got {frames}; nearest valid: {n})")
    return "; ".join(problems) or None


def validate_latent_inputs(format_name, width, height, frames, *, max_size: int, max_frames: int) -> bool | str:
    """VALIDATE_INPUTS body of Empty Video Latent: True, or a message with the nearest valid values."""
    if any(v is None for v in (format_name, width, height, frames)):
        return True  # linked inputs are checked when the node runs
    if format_name not in LATENT_FORMATS:
        return f"latent_format must be one of {list(LATENT_FORMATS)}; got {format_name!r}"
    for name, value, lo, hi in (("width", width, 16, max_size), ("height", height, 16, max_size), ("frames", frames, 1, max_frames)):
        if not lo <= value <= hi:
            return f"{name} must be between {lo} and {hi}; got {value}"
    return check_video_size(format_name, width, height, frames) or True


FLOAT32_BYTES = 4


def video_memory_problem(format_name: str, width: int, height: int, frames: int, batch: int, budget: int,
                         raise_budget: str) -> str | None:
    """None when the tensors a latent of this size leads to fit `budget` bytes, else how much they need and how to
    raise the budget (`raise_budget`). Counted in float32: the latent and the frames it decodes to (IMAGE [B*F, H, W,
    3]), the largest tensor of a text-to-video run."""
    fmt = LATENT_FORMATS[format_name]
    latent = math.prod(fmt.latent_shape(batch, frames, height, width)) * FLOAT32_BYTES
    decoded = batch * frames * height * width * 3 * FLOAT32_BYTES
    if latent + decoded <= budget:
        return None
    return (f"{batch} video(s) of {width}x{height}, {frames} frames need {_size(latent + decoded)} (latent "
            f"{_size(latent)}, decoded frames {_size(decoded)}, float32), more than the memory budget of "
            f"{_size(budget)}; make the video smaller or shorter, or {raise_budget}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
