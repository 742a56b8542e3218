"""Context windows: denoise long videos in overlapping windows of frames and blend the results.

The frame axis is dim 2 of a [B, C, T, H, W] latent. A schedule lists windows (lists of frame indices, each
exactly `min(length, T)` frames); the wrapped denoiser runs on one window at a time and the x0 estimates are
averaged per frame with fusion weights, so peak memory is one window's activations plus two latent-sized
buffers.

Schedules (n = number of frames, L = length, o = overlap):
- `static`: contiguous windows starting at 0, L − o apart; the last one is moved back to end at frame n−1
  (its overlap with the previous window may be larger than o).
- `uniform`: contiguous windows spread evenly over the video (the fewest windows whose neighbours overlap by
  at least o, all overlaps within one frame of each other). With `stride` k > 1 it adds dilated levels
  2, 4, ..., 2^(k−1): at level s every phase p < s of frames p, p+s, p+2s, ... is windowed the same way
  (a level is used only if each phase has at least L frames), which links distant frames.
- `looped`: contiguous windows L − o apart that wrap around the end (frame n−1 is followed by frame 0); the
  last window overlaps the first one by at least o frames, so the video loops seamlessly.

Fusion weights over the L positions of a window:
- `flat`: all 1.
- `pyramid`: min(j+1, L−j), highest in the middle.
- `overlap-linear`: 1 in the middle, ramping linearly (j+1)/(o+1) over the first and last o positions.
All weights are > 0 and the blend is normalised per frame, so a frame seen by one window keeps its value.

`ContextOptions` is the KINEFLOW_CONTEXT_OPTIONS payload.

While a window's denoiser call runs, `current_window()` names its frames (and the video's length), for whatever
needs to know which frames of the video a call sees: prompt travel gives each window its frames' prompts, a step
cache keeps one state per window, SparseCtrl gives each window the keyframes that fall inside it. Outside context
windows (or with a single window) it is None: the call sees every frame.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import KineFlowError, RankFailure
from . import context_problem

SCHEDULES = ("uniform", "static", "looped")
FUSE_METHODS = ("pyramid", "flat", "overlap-linear")


@dataclass(frozen=True)
class ContextOptions:
    length: int = 16
    overlap: int = 4
    stride: int = 1
    schedule: str = "uniform"
    fuse_method: str = "pyramid"

    def __post_init__(self):
        problem = context_problem(self.length, self.overlap, self.stride)
        if problem:
            raise KineFlowError(problem)
        if self.schedule not in SCHEDULES:
            raise KineFlowError(f"unknown context schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.fuse_method not in FUSE_METHODS:
            raise KineFlowError(
                f"unknown context fuse method {self.fuse_method!r}; expected one of {', '.join(FUSE_METHODS)}"
            )


def _even_starts(n: int, length: int, overlap: int) -> list[int]:
    """Start offsets of evenly spread windows of `length` over n items, neighbours overlapping >= overlap."""
    if n <= length:
        return [0]
    count = math.ceil((n - overlap) / (length - overlap))
    spacing = (n - length) / (count - 1)
    # floor(x + 0.5) rather than round(): shift-invariant, so rounded spacings never exceed length - overlap.
    return [math.floor(i * spacing + 0.5) for i in range(count)]


def _static_starts(n: int, length: int, overlap: int) -> list[int]:
    if n <= length:
        return [0]
    starts = list(range(0, n - length, length - overlap))
    return starts + [n - length]


class Window(NamedTuple):
    frames: tuple[int, ...]  # the latent frames of the video a call sees, in the order it sees them
    total: int  # the video's latent frames


_WINDOW: contextvars.ContextVar[Window | None] = contextvars.ContextVar("kineflow_context_window", default=None)


def current_window() -> Window | None:
    """The context window whose denoiser call is running, or None (no context windows: the call sees the video)."""
    return _WINDOW.get()


def context_windows(num_frames: int, options: ContextOptions) -> list[list[int]]:
    """The frame indices of every window for a video of `num_frames` frames."""
    n, length, overlap = int(num_frames), options.length, options.overlap
    if n < 1:
        raise KineFlowError(f"context windows need at least 1 frame, got {n}")
    if n <= length:
        return [list(range(n))]
    if options.schedule == "static":
        return [list(range(s, s + length)) for s in _static_starts(n, length, overlap)]
    if options.schedule == "looped":
        step = length - overlap
        return [[(s + j) % n for j in range(length)] for s in range(0, n, step)]
    windows = []
    for level in range(options.stride):
        dilation = 2**level
        if level > 0 and n // dilation < length:
            break
        for phase in range(dilation):
            frames = list(range(phase, n, dilation))
            windows += [frames[s : s + length] for s in _even_starts(len(frames), length, overlap)]
    return windows


def fusion_weights(window_length: int, options: ContextOptions) -> torch.Tensor:
    """Positive blend weights (float32) for the positions of one window."""
    j = torch.arange(window_length, dtype=torch.float32)
    if options.fuse_method == "flat":
        return torch.ones(window_length)
    if options.fuse_method == "pyramid":
        return torch.minimum(j + 1, window_length - j)
    ramp = min(options.overlap, window_length // 2)
    weights = torch.ones(window_length)
    if ramp > 0:
        edge = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
        weights[:ramp] = edge
        weights[window_length - ramp :] = edge.flip(0)
    return weights


def context_window_denoiser(denoiser, options: ContextOptions, group=None):
    """Wrap `denoiser(x, sigma)` so that it only ever sees windows of at most `options.length` frames; each window's
    call runs with `current_window()` naming its frames.

    `group`, a torch.distributed process group, shares the windows out over its ranks: in each round of n windows
    (n ranks) rank r runs window r of the round, the round's results are all-gathered, and every rank blends every
    window in the order one process does, so the result is the same bit for bit on every rank and as without it."""
    def windowed(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise KineFlowError(f"context windows expect a [B, C, T, H, W] latent, got shape {tuple(x.shape)}")
        frames = x.shape[2]
        windows = context_windows(frames, options)
        if len(windows) == 1:
            return denoiser(x, sigma)
        out = torch.zeros_like(x)
        total = torch.zeros(frames, dtype=x.dtype, device=x.device)

        def run(window):
            token = _WINDOW.set(Window(tuple(window), frames))
            try:
                return denoiser(x.index_select(2, torch.tensor(window, device=x.device)), sigma)
            finally:
                _WINDOW.reset(token)

        results = ((window, run(window)) for window in windows) if group is None else _shared(windows, run, x, group)
        for window, denoised in results:
            index = torch.tensor(window, device=x.device)
            weights = fusion_weights(len(window), options).to(device=x.device, dtype=x.dtype)
            out.index_add_(2, index, denoised * weights.view(1, 1, -1, 1, 1))
            total.index_add_(0, index, weights)
        return out / total.view(1, 1, -1, 1, 1)

    return windowed


def _shared(windows: list[list[int]], run, x: torch.Tensor, group):
    """(window, denoised) for every window, in order, each computed by one rank of `group` (see
    context_window_denoiser). Every window has the same length, so the rounds' tensors have one shape."""
    import torch.distributed as dist

    size, me = dist.get_world_size(group), dist.get_rank(group)
    shape = (x.shape[0], x.shape[1], len(windows[0]), *x.shape[3:])
    for first in range(0, len(windows), size):
        round_ = windows[first:first + size]
        mine = run(round_[me]).to(x.dtype).contiguous() if me < len(round_) else x.new_zeros(shape)
        gathered = [torch.empty_like(mine) for _ in range(size)]
        try:
            dist.all_gather(gathered, mine, group=group)
        except Exception as error:  # a closed peer or the collective timeout
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise RankFailure(f"context windows: rank {dist.get_rank()} lost the other ranks (a rank died, failed or "
                              f"did not answer in time); nothing was written. ({detail})") from None
        yield from zip(round_, gathered)


def window_edges(num_frames: int, options: ContextOptions) -> list[int]:
    """Frame positions where a window starts or ends inside the video: where seams would show.

    Edge e means the step from frame e-1 to frame e crosses a window boundary (contiguous windows only)."""
    edges = set()
    for window in context_windows(num_frames, options):
        if window != list(range(window[0], window[0] + len(window))):
            continue  # dilated or wrapped windows have no single boundary frame
        for edge in (window[0], window[-1] + 1):
            if 0 < edge < num_frames:
                edges.add(edge)
    return sorted(edges)


def seam_ratio(frames: torch.Tensor, edges: list[int]) -> float:
    """Mean frame-to-frame change across `edges` over the median change elsewhere (1.0 = seamless).

    `frames` is [F, ...] (IMAGE frames or latent frames); the change from frame i-1 to i is the mean absolute
    difference. The issue's criterion for 64 frames with windows of 16 / overlap 4 is a ratio <= 1.5."""
    if frames.shape[0] < 3 or not edges:
        raise KineFlowError(f"a seam ratio needs at least 3 frames and one window edge; got {frames.shape[0]} frames, edges {edges}")
    change = (frames[1:].float() - frames[:-1].float()).abs().flatten(1).mean(dim=1)  # change[i-1]: frame i-1 -> i
    at_edges = torch.tensor([e - 1 for e in edges])
    mask = torch.ones(len(change), dtype=torch.bool)
    mask[at_edges] = False
    return float(change[at_edges].mean() / change[mask].median().clamp_min(1e-12))
