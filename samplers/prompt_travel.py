"""Prompt travel at sampling time: each latent frame denoised under its own interpolated prompt.

`TravelDenoiser` replaces the CFG wrapper when the conditioning carries a schedule (samplers/prompt_schedule.py).
It holds the model keyword arguments of every keyframe's prompt (`net_kwargs`, on the device) and a weight row per
latent frame, and on each call mixes the keyframes' text tensors for the frames of that call: the whole video, or,
inside context windows, the window's frames (`window` is the context windows' scope, so each window gets the prompt
of its own frames).

How a mix reaches the model depends on how the model reads text (the handle's `frame_text` flag):

- Per-frame text (`frame_text = True`, the SD1.5 UNet + AnimateDiff): the UNet denoises the frames as a batch and
  each frame cross-attends to its own context, so one call gets text tensors with a frame axis, [B, F, ...], frame
  f holding its interpolated embeddings. This is ADE's prompt travel exactly.
- One text per call (HunyuanVideo's DiT): the text tokens join the video tokens in one full attention, so a call
  holds one prompt. A call whose frames all have the same weights (a window inside one keyframe's span, or a
  schedule of one prompt) runs once with that interpolated prompt. Otherwise the frames are grouped by their
  weights and the model runs once per group, on the whole window, with the group's interpolated prompt; each
  frame takes its x0 from its own group's pass. So every latent frame is denoised under exactly its interpolated
  prompt while still attending to all video tokens of the window. The price is one pass per distinct weight row
  (two for a hard switch, up to one per latent frame along a gradual ramp); see DEVELOPING.md for the alternatives.

Mixing: floating text tensors of two or more dimensions ([B, tokens, D] states, [B, D] pooled vectors) are mixed
linearly, a shorter token axis padded with zeros first (as FizzNodes' average pads); token masks are united (a token
valid in either prompt is attended to; masks stay where the text encoder put them); anything else (the embedded
guidance scale, the same for every keyframe) is taken from the first keyframe. A mix is computed once per distinct
weight row per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import KineFlowError
from .context import current_window
from .guidance import Denoiser, guided_call


def _pad_tokens(value: torch.Tensor, length: int) -> torch.Tensor:
    if value.ndim < 2 or value.shape[1] == length:
        return value
    pad = value.new_zeros((value.shape[0], length - value.shape[1], *value.shape[2:]))
    return torch.cat([value, pad], dim=1)


def mix_conditions(keyed: Sequence[Mapping[str, Any]], row: Sequence[float]) -> dict[str, Any]:
    """The keyframes' model keyword arguments mixed with weights `row` (one per keyframe, summing to 1)."""
    active = [(w, kw) for w, kw in zip(row, keyed) if w != 0.0]
    if len(active) == 1:
        return dict(active[0][1])
    out: dict[str, Any] = {}
    for key, first in keyed[0].items():
        values = [kw[key] for _, kw in active]
        if not isinstance(first, torch.Tensor) or first.ndim < 2:
            out[key] = first
            continue
        length = max(v.shape[1] for v in values)
        padded = [_pad_tokens(v, length) for v in values]
        if first.is_floating_point():
            mixed = padded[0] * active[0][0]
            for (w, _), v in zip(active[1:], padded[1:]):
                mixed = mixed + v * w
            out[key] = mixed
        else:  # token masks: valid where any mixed prompt has a token
            united = padded[0].bool()
            for v in padded[1:]:
                united = united | v.bool()
            out[key] = united.to(first.dtype)
    return out


def _per_frame(value: Any, frames: int) -> Any:
    """A text tensor [B, ...] given a frame axis [B, F, ...] (the same text for every frame)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.is_floating_point():
        return value.unsqueeze(1).expand(value.shape[0], frames, *value.shape[1:])
    return value


class TravelDenoiser:
    """`d(x, sigma)`: CFG over per-frame interpolated prompts (see the module docstring).

    `keyed`: each keyframe's model keyword arguments (as `make_cfg_denoiser` takes them); `uncond`: the negative
    prompt's, or None; `weights`: one row per latent frame (samplers/prompt_schedule.latent_frame_weights)."""

    def __init__(self, denoiser: Denoiser, keyed: Sequence[Mapping[str, Any]], uncond: Mapping[str, Any] | None,
                 scale: float, weights: Sequence[Sequence[float]], frame_text: bool, batched: bool = True):
        if scale < 0:
            raise KineFlowError(f"cfg scale must be >= 0, got {scale!r}")
        if not keyed or any(len(row) != len(keyed) for row in weights):
            raise KineFlowError(f"prompt travel needs one weight per keyframe prompt in every row; found "
                                f"{len(keyed)} prompts and rows of {sorted({len(r) for r in weights})}")
        self.denoiser, self.keyed, self.scale, self.batched = denoiser, [dict(k) for k in keyed], scale, batched
        self.uncond = None if uncond is None or scale == 1.0 else dict(uncond)
        self.rows = [tuple(float(w) for w in row) for row in weights]
        self.frame_text = frame_text
        self._mixes: dict[tuple[float, ...], dict[str, Any]] = {}
        self._per_frame: dict[str, Any] | None = None

    def mix(self, row: tuple[float, ...]) -> dict[str, Any]:
        if row not in self._mixes:
            self._mixes[row] = mix_conditions(self.keyed, row)
        return self._mixes[row]

    def _frame_conditioning(self, frames: tuple[int, ...], x: torch.Tensor) -> dict[str, Any]:
        """Text tensors [B, F, ...] for `frames`, from the per-frame mixes of the whole video (built once)."""
        if self._per_frame is None:
            mixes = [self.mix(row) for row in self.rows]
            self._per_frame = {}
            for key, first in mixes[0].items():
                if isinstance(first, torch.Tensor) and first.ndim >= 2 and first.is_floating_point():
                    length = max(m[key].shape[1] for m in mixes)
                    self._per_frame[key] = torch.stack([_pad_tokens(m[key], length) for m in mixes], dim=1)
                else:
                    self._per_frame[key] = first
        if len(frames) == len(self.rows) and frames == tuple(range(len(self.rows))):
            return self._per_frame
        index = torch.tensor(frames, device=x.device)
        return {k: v.index_select(1, index.to(v.device)) if isinstance(v, torch.Tensor) and v.ndim >= 3 else v
                for k, v in self._per_frame.items()}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        window = current_window()  # inside context windows: the frames of the running window
        frames = window.frames if window is not None else tuple(range(x.shape[2]))
        if x.ndim != 5 or len(frames) != x.shape[2] or max(frames) >= len(self.rows):
            raise KineFlowError(f"prompt travel has weights for {len(self.rows)} latent frames; the model was called "
                                f"on a latent of shape {tuple(x.shape)} for frames {list(frames)[:8]}")
        if self.frame_text:
            cond = self._frame_conditioning(frames, x)
            uncond = None if self.uncond is None else {k: _per_frame(v, len(frames)) for k, v in self.uncond.items()}
            return guided_call(self.denoiser, x, sigma, cond, uncond, self.scale, self.batched)
        groups: dict[tuple[float, ...], list[int]] = {}
        for position, frame in enumerate(frames):
            groups.setdefault(self.rows[frame], []).append(position)
        if len(groups) == 1:
            return guided_call(self.denoiser, x, sigma, self.mix(next(iter(groups))), self.uncond, self.scale,
                               self.batched)
        out = torch.empty_like(x)
        for row, positions in groups.items():
            denoised = guided_call(self.denoiser, x, sigma, self.mix(row), self.uncond, self.scale, self.batched)
            index = torch.tensor(positions, device=x.device)
            out.index_copy_(2, index, denoised.index_select(2, index))
        return out
