"""Step caching: on steps where a model's blocks would change little, skip them and reuse what they added last time.

A model that supports it takes an optional `step_cache` argument (the models' `StepCacheHook`: `reuse(probe)` and
`store(residual)`). Each evaluation it computes a cheap *probe* first and asks `reuse(probe)`; a tensor back is the
residual its blocks added at the last evaluation that ran them (their output minus their input), which it adds
instead of running them; None means run them and `store` the new residual. Two criteria judge the probes:

- TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model") for the
  HunyuanVideo transformer. The probe is the first double block's modulated image input (the tokens normed and
  modulated by that block's timestep-dependent shift and scale), which costs one norm. Its relative L1 change from
  the previous step, mapped through a polynomial fitted per model (change of the model output per change of the
  probe), is summed over the steps since the blocks last ran; while the sum stays under the threshold they are
  skipped, and a step that runs them starts the sum again.
- First-block cache for the SD1.5 UNet: the generic criterion, which needs no fitted polynomial. The probe is the
  residual of the model's first block, which runs every step; the other blocks are skipped while that residual
  differs from its value at the last evaluation that ran them by less than the threshold (relative L1).

Both estimate how far the model's output has moved since its blocks last ran, as a relative L1 change (TeaCache's
polynomial maps probe changes to output changes; the UNet's first-block residual moves roughly as its output
does), so a threshold means about the same for both: how far the output may drift before the blocks run again.
Which criterion a model gets comes from its handle (`step_cache_criterion`). Decisions are per model call, over the
whole batch: a skip saves work only when the whole batch skips, so a call runs the blocks as soon as one batch item
(a video, or CFG's conditional or unconditional copy of it) has changed by the threshold; each item keeps its own
residual. Every stream of calls keeps its own state (`StepCacheRun.bind`): each context window (keyed by its frame
indices) and, when CFG runs its two passes as separate calls, each pass. The first and last steps always run the
blocks, as does every call on `meta` (a dry run has no values to decide from), and state lives for one sampling
run. A threshold of 0 never skips.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..errors import KineFlowError, ModelFileError
from . import DEFAULT_STEP_CACHE_THRESHOLD
from .context import current_window

# TeaCache's polynomial for the released HunyuanVideo transformer (highest power first), as published in
# github.com/ali-vilab/TeaCache, TeaCache4HunyuanVideo/teacache_sample_video.py.
RELEASED_TEACACHE_COEFFICIENTS = {
    "hunyuan_video": (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02),
}
# A model file's own polynomial, fitted by `python -m kineflow.training.teacache` (the shipped tiny transformer):
# {"coefficients": [highest power first], ...how it was fitted}.
COEFFICIENTS_METADATA_KEY = "kineflow.teacache_coefficients"


@dataclass(frozen=True)
class StepCacheOptions:
    """KINEFLOW_STEP_CACHE: what the Step Cache node hands the Sampler."""

    threshold: float = DEFAULT_STEP_CACHE_THRESHOLD

    def __post_init__(self):
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise KineFlowError(f"step cache threshold must be a finite number >= 0, got {self.threshold!r}")


@dataclass(frozen=True)
class CacheCriterion:
    """How the probes of one model are judged (see the module docstring)."""

    name: str
    accumulate: bool  # TeaCache: sum the changes from step to step; first-block: change since the blocks last ran
    coefficients: tuple[float, ...] = (1.0, 0.0)  # probe change -> estimated output change, highest power first

    def rescale(self, change: torch.Tensor) -> torch.Tensor:
        """The estimated output change; never below 0 (a fitted polynomial may dip below it off its data)."""
        out = torch.zeros_like(change, dtype=torch.float64)
        for c in self.coefficients:  # Horner's rule
            out = out * change + c
        return out.clamp_min(0)


def teacache(coefficients: tuple[float, ...]) -> CacheCriterion:
    return CacheCriterion("teacache", accumulate=True, coefficients=tuple(float(c) for c in coefficients))


FIRST_BLOCK = CacheCriterion("first-block", accumulate=False)


def teacache_coefficients(metadata: Mapping[str, str], family: str, source: str) -> tuple[float, ...]:
    """The TeaCache polynomial of the model file `source`: its own, fitted one when its metadata carries it, else the
    published one of the family's released model (any other file is taken for that model, or a fine-tune of it)."""
    if COEFFICIENTS_METADATA_KEY not in metadata:
        return RELEASED_TEACACHE_COEFFICIENTS[family]
    try:
        coefficients = tuple(float(c) for c in json.loads(metadata[COEFFICIENTS_METADATA_KEY])["coefficients"])
    except (ValueError, TypeError, KeyError):
        coefficients = ()
    if not coefficients or not all(math.isfinite(c) for c in coefficients):
        raise ModelFileError(f"{source!r} has metadata {COEFFICIENTS_METADATA_KEY} = "
                             f"{metadata[COEFFICIENTS_METADATA_KEY][:60]!r}; expected JSON with a list of finite "
                             "numbers under 'coefficients'")
    return coefficients


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Per batch item (dim 0): mean |now - before| / mean |before|, in float32 on the CPU (one device sync)."""
    now, before = now.flatten(1).float(), before.flatten(1).float()
    return ((now - before).abs().mean(dim=1) / before.abs().mean(dim=1)).cpu()


class _Stream:
    """The cache state of one stream of model calls; what the model's `step_cache` argument gets."""

    def __init__(self, run: "StepCacheRun"):
        self.run = run
        self.probe: torch.Tensor | None = None  # the reference the next probe is compared with
        self.distance: torch.Tensor | None = None  # TeaCache: summed estimated change per batch item
        self.residual: torch.Tensor | None = None

    def reuse(self, probe: torch.Tensor) -> torch.Tensor | None:
        run, criterion = self.run, self.run.criterion
        skip = False
        if not (run.must_compute() or probe.is_meta or self.residual is None or self.probe is None
                or self.probe.shape != probe.shape):
            change = criterion.rescale(relative_l1(probe, self.probe))
            if criterion.accumulate:
                change = change + self.distance
            skip = bool((change < run.threshold).all())
        # TeaCache compares each step's probe with the previous one's; first-block with that of the last full step.
        if criterion.accumulate or not skip:
            self.probe = probe
        self.distance = change if skip else torch.zeros(probe.shape[0])  # the sum starts again at a full step
        run.calls += 1
        run.skips += skip
        return self.residual if skip else None

    def store(self, residual: torch.Tensor) -> None:
        self.residual = residual


class StepCacheRun:
    """The step cache of one sampling run over `steps` steps.

    Wire it as `run.wrap(denoiser)` outermost (it counts the sampler's steps: every sampler calls its denoiser once
    per step), `run.window` as the context windows' scope, and `run.bind(net_fn)` innermost, which hands each model
    call its stream's state."""

    def __init__(self, options: StepCacheOptions, criterion: CacheCriterion, steps: int):
        self.threshold, self.criterion, self.steps = float(options.threshold), criterion, steps
        self.step = -1
        self.calls = self.skips = 0  # model calls, and those that skipped the blocks
        self._streams: dict[tuple, _Stream] = {}
        self._window: tuple[int, ...] | None = None
        self._call_in_window = 0

    def must_compute(self) -> bool:
        return self.step <= 0 or self.step >= self.steps - 1

    def wrap(self, denoiser: Callable) -> Callable:
        def stepped(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            self.step += 1
            self._window, self._call_in_window = None, 0
            return denoiser(x, sigma)

        return stepped

    def bind(self, net_fn: Callable) -> Callable:
        def cached(x: torch.Tensor, timestep: torch.Tensor, **kwargs) -> torch.Tensor:
            # Inside context windows each window keeps its own state; a window's calls in one step come in a fixed
            # order: one call, or CFG's conditional then unconditional.
            window = current_window()
            frames = None if window is None else window.frames
            if frames != self._window:
                self._window, self._call_in_window = frames, 0
            key = (self._window, self._call_in_window)
            self._call_in_window += 1
            stream = self._streams.setdefault(key, _Stream(self))
            return net_fn(x, timestep, step_cache=stream, **kwargs)

        return cached
