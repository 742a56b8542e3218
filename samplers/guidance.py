"""Guidance wrappers: bind conditioning to a denoiser and combine conditional and unconditional passes.

Classifier-free guidance mixes the two x0 estimates: x0 = x0_uncond + scale·(x0_cond − x0_uncond). Because
every parametrisation here turns the net output into x0 with an affine map whose coefficients do not depend
on the conditioning (x0 = x − σ·ε, x0 = x − σ·v_flow, x0 = a·x + b·v), mixing x0 estimates is identical to
mixing the raw ε / v / velocity predictions as diffusers does.

Conditioning is a dict of keyword arguments for the network (`denoiser(x, sigma, **cond)`, see
`ModelSampling.wrap`): e.g. `{"context": tokens}` for the SD1.5 UNet or
`{"txt": ..., "txt_mask": ..., "clip_pooled": ..., "guidance": ...}` for HunyuanVideo.

Embedded guidance (HunyuanVideo, guidance-distilled): the guidance strength is not a mix of two passes but a
model input. It travels in the conditioning dict as `guidance`, a float tensor of shape [B] holding the scale
as the user sets it (e.g. 6.0); the network wrapper applies the ×1000 that the reference pipeline applies
before embedding it like a timestep. Such models run with cfg scale 1, i.e. a single pass;
`embedded_guidance(cond, scale)` adds the entry.

`make_cfg_denoiser` evaluates cond and uncond in one batched call when their tensors can be stacked along
the batch axis (same shapes apart from the batch dimension, which may be 1 or B; equal non-tensor values),
and in two calls otherwise (e.g. text embeddings of different token counts). With scale 1 (or no uncond)
only the conditional pass runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import KineFlowError

Denoiser = Callable[..., torch.Tensor]


def cfg(denoiser_cond: Denoiser, denoiser_uncond: Denoiser | None, scale: float) -> Denoiser:
    """Classifier-free guidance over two conditioning-bound denoisers `d(x, sigma)`."""
    if denoiser_uncond is None or scale == 1.0:
        return denoiser_cond

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = denoiser_cond(x, sigma)
        uncond = denoiser_uncond(x, sigma)
        return uncond + (cond - uncond) * scale

    return guided


def embedded_guidance(cond: Mapping[str, Any], scale: float, batch_size: int = 1) -> dict[str, Any]:
    """A copy of `cond` with the `guidance` model input set to `scale` for each of `batch_size` entries."""
    out = dict(cond)
    out["guidance"] = torch.full((batch_size,), float(scale), dtype=torch.float32)
    return out


def _batch_tensor(value: torch.Tensor, batch: int) -> torch.Tensor | None:
    """`value` with batch dimension `batch` (a batch of 1 is expanded), or None if it has another batch size."""
    if value.ndim == 0:
        return None
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    return None


def stack_conditions(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Any] | None:
    """Merge two conditioning dicts into one for a 2·batch call (cond first), or None when impossible."""
    if cond.keys() != uncond.keys():
        return None
    merged: dict[str, Any] = {}
    for key, a in cond.items():
        b = uncond[key]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            a_b, b_b = _batch_tensor(a, batch), _batch_tensor(b, batch)
            if a_b is None or b_b is None or a_b.shape[1:] != b_b.shape[1:] or a_b.dtype != b_b.dtype:
                if a.shape == b.shape and torch.equal(a, b):
                    merged[key] = a  # shared and not batched (e.g. a scalar): pass as is
                    continue
                return None
            merged[key] = torch.cat([a_b, b_b.to(a_b.device)])
        elif isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return None
        elif a == b:
            merged[key] = a
        else:
            return None
    return merged


def make_cfg_denoiser(
    denoiser: Denoiser,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any] | None,
    scale: float,
    batched: bool = True,
) -> Denoiser:
    """Bind conditioning to `denoiser(x, sigma, **cond)` and apply CFG; returns `d(x, sigma)`.

    `batched=False` always uses two calls (half the activation memory of the batched call).
    """
    if scale < 0:
        raise KineFlowError(f"cfg scale must be >= 0, got {scale!r}")
    cond = dict(cond)
    if uncond is None or scale == 1.0:
        return lambda x, sigma: denoiser(x, sigma, **cond)
    uncond = dict(uncond)
    return lambda x, sigma: guided_call(denoiser, x, sigma, cond, uncond, scale, batched)


def guided_call(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
                uncond: Mapping[str, Any] | None, scale: float, batched: bool = True) -> torch.Tensor:
    """One CFG evaluation of `denoiser(x, sigma, **cond)` against `uncond` (conditioning chosen per call, as prompt
    travel does: samplers/prompt_travel.py)."""
    if uncond is None or scale == 1.0:
        return denoiser(x, sigma, **cond)
    stacked = stack_conditions(cond, uncond, x.shape[0]) if batched else None
    if stacked is not None:
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **stacked)
        x0_cond, x0_uncond = both.chunk(2)
    else:
        x0_cond = denoiser(x, sigma, **cond)
        x0_uncond = denoiser(x, sigma, **uncond)
    return x0_uncond + (x0_cond - x0_uncond) * scale


def first_frame_denoiser(denoiser: Denoiser, frame: torch.Tensor,
                         noised: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Denoiser:
    """Image to video with a pinned first frame: latent frame 0 of every estimate the denoiser returns is the clean
    image latent `frame` [B, C, 1, H, W], so any sampler ends on it; the other frames are denoised as usual. What
    the model sees in frame 0: the clean latent (HunyuanVideo-I2V's token replace, whose model reads that frame as
    timestep 0; the reference pipeline steps frames 1.. only and puts the image back in front, the model's inputs
    are the same), or `noised(sigma)`, the image noised to the step's sigma (AnimateDiff's image to video, whose
    UNet reads every frame at the step's noise level; the motion module carries the first frame into the others)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen = frame if noised is None else noised(sigma)
        x = torch.cat((seen.to(x.dtype), x[:, :, 1:]), dim=2)
        x0 = denoiser(x, sigma)
        return torch.cat((frame.to(x0.dtype), x0[:, :, 1:]), dim=2)

    return denoise
