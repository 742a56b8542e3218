"""Animated latent previews: what the Sampler node plays while it samples inside ComfyUI.

After each step the sampler's current estimate of the clean latent (x0) is mapped to RGB by a linear latent -> RGB
map, every latent frame of it, and sent as one PNG holding the frames side by side; the web extension
(web/kineflow.js) plays them on the Sampler node. A VAE decode could cost as much as the step; the linear map and
the PNG cost a small share of it (benchmarks/bench_previews.py). Standalone nothing shows previews and none are
built.

Which map a model gets: a file carrying `kineflow.latent_rgb_factors` in its metadata has a VAE of its own whose
factors were fitted by KineFlow's trainers (the shipped tiny models); any other file is taken for a released
model of its family and gets the published factors of that family's released VAE.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .latent_formats import LatentFormat

FACTORS_METADATA_KEY = "kineflow.latent_rgb_factors"  # {"factors": [[r, g, b] per latent channel], "bias": [r, g, b]}

# The released VAEs' latent -> RGB factors (one row per latent channel; R, G, B columns; applied to scaled latents,
# giving -1..1), as published in ComfyUI's comfy/latent_formats.py, classes SD15 (no bias) and HunyuanVideo.
RELEASED_FACTORS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]] = {
    "sd15": (
        ((0.3512, 0.2297, 0.3227),
         (0.3250, 0.4974, 0.2350),
         (-0.2829, 0.1762, 0.2721),
         (-0.2120, -0.2616, -0.7177)),
        (0.0, 0.0, 0.0),
    ),
    "hunyuan_video": (
        ((-0.0395, -0.0331, 0.0445),
         (0.0696, 0.0795, 0.0518),
         (0.0135, -0.0945, -0.0282),
         (0.0108, -0.0250, -0.0765),
         (-0.0209, 0.0032, 0.0224),
         (-0.0804, -0.0254, -0.0639),
         (-0.0991, 0.0271, -0.0669),
         (-0.0646, -0.0422, -0.0400),
         (-0.0696, -0.0595, -0.0894),
         (-0.0799, -0.0208, -0.0375),
         (0.1166, 0.1627, 0.0962),
         (0.1165, 0.0432, 0.0407),
         (-0.2315, -0.1920, -0.1355),
         (-0.0270, 0.0401, -0.0821),
         (-0.0616, -0.0997, -0.0727),
         (0.0249, -0.0469, -0.1703)),
        (0.0259, -0.0192, -0.0761),
    ),
}

MAX_FRAMES = 48  # more latent frames are thinned out evenly (129 HunyuanVideo frames are 33 latent frames)
MAX_SIDE = 128  # pixels of a frame's longer side; larger latents are area-averaged down
PLAYBACK_FPS = 8.0  # video frames per second the preview plays at (the shipped workflows' rate)
BUDGET_SHARE = 0.05  # of the sampling time, at most, spent on previews


def released_factors(fmt: LatentFormat) -> tuple[torch.Tensor, torch.Tensor]:
    factors, bias = RELEASED_FACTORS[fmt.name]
    return torch.tensor(factors), torch.tensor(bias)


def preview_factors(metadata: Mapping[str, str], fmt: LatentFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(factors [C, 3], bias [3]) for a model file of latent format `fmt`: the fitted ones in its metadata when it
    carries them, finite, with one row per latent channel, else the released VAE's."""
    try:
        data = json.loads(metadata[FACTORS_METADATA_KEY])
        factors = torch.tensor(data["factors"], dtype=torch.float32)
        bias = torch.tensor(data["bias"], dtype=torch.float32)
    except (KeyError, ValueError, TypeError, RecursionError):
        return released_factors(fmt)
    if factors.shape != (fmt.channels, 3) or bias.shape != (3,):
        return released_factors(fmt)
    if not (factors.isfinite().all() and bias.isfinite().all()):
        return released_factors(fmt)
    return factors, bias


def preview_frames(latent: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """uint8 RGB frames [T, h, w, 3] on the CPU of the first video of a latent [B, C, T, H, W]: at most MAX_FRAMES
    (evenly spaced), at most MAX_SIDE pixels a side. Latents are averaged down before the map: the map is linear,
    so that equals averaging the colours, for less work."""
    x = latent[0].detach().float()
    count = x.shape[1]
    if count > MAX_FRAMES:
        x = x[:, torch.linspace(0, count - 1, MAX_FRAMES, device=x.device).round().long()]
    height, width = x.shape[-2:]
    scale = MAX_SIDE / max(height, width)
    if scale < 1:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        x = F.interpolate(x.transpose(0, 1), size=size, mode="area").transpose(0, 1)
    rgb = torch.einsum("cthw,cr->thwr", x, factors.to(x.device)) + bias.to(x.device)
    return ((rgb + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


@dataclass(frozen=True)
class AnimatedPreview:
    png: bytes  # the frames side by side, first frame on the left
    frames: int
    width: int  # of one frame
    height: int
    frame_ms: int  # how long each frame shows

    def message(self) -> dict:
        """The JSON the web extension plays (the host adds the node's id)."""
        return {"image": "data:image/png;base64," + base64.b64encode(self.png).decode("ascii"),
                "frames": self.frames, "width": self.width, "height": self.height, "frame_ms": self.frame_ms}


def animated_preview(latent: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor,
                     temporal_ratio: int) -> AnimatedPreview:
    """The preview of a latent video [B, C, T, H, W] whose latent frames stand for `temporal_ratio` video frames
    each, playing at PLAYBACK_FPS video frames per second."""
    frames = preview_frames(latent, factors, bias)
    count, height, width = frames.shape[:3]
    strip = frames.permute(1, 0, 2, 3).reshape(height, count * width, 3).numpy()
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG", compress_level=1)  # lossless: no colour bleeds between frames
    video_frames_per_frame = temporal_ratio * latent.shape[2] / count
    return AnimatedPreview(buffer.getvalue(), count, width, height,
                           frame_ms=max(1, round(1000.0 * video_frames_per_frame / PLAYBACK_FPS)))


class PreviewBudget:
    """Keeps previews under BUDGET_SHARE of the sampling time: one is due only while the time spent on previews so
    far is at most that share of the time since sampling began. When steps are fast next to a preview, previews
    thin out instead of slowing the steps down."""

    def __init__(self, share: float = BUDGET_SHARE, clock=time.perf_counter):
        self.share = share
        self.clock = clock
        self.start = clock()
        self.spent = 0.0

    def due(self) -> bool:
        return self.spent <= self.share * (self.clock() - self.start)

    @contextlib.contextmanager
    def spending(self):
        began = self.clock()
        try:
            yield
        finally:
            self.spent += self.clock() - began
