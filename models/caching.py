"""The hook through which a sampler's step cache lets a model skip its blocks (samplers/step_cache.py implements it).

A model that supports step caching takes `step_cache: StepCacheHook | None` in its forward. With a hook, each call
computes a cheap probe (HunyuanVideo: the first double block's modulated image input; the SD1.5 UNet: the residual
of its first block), then:

    residual = step_cache.reuse(probe)
    if residual is None:             # run the blocks as usual
        out = blocks(h)
        step_cache.store(out - h)
    else:                            # skip them
        out = h + residual

Dim 0 of a probe indexes the batch's independent items (videos); the residual is the model's own tensor, given back
as it was stored. Probe and residual must be tensors the model does not change in place afterwards.
"""

from __future__ import annotations

from typing import Protocol

import torch


class StepCacheHook(Protocol):
    def reuse(self, probe: torch.Tensor) -> torch.Tensor | None:
        """The residual to add instead of running the blocks, or None to run them (then call `store`)."""

    def store(self, residual: torch.Tensor) -> None:
        """The residual the blocks just added: their output minus their input."""
