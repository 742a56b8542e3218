"""Model parametrisations and samplers.

A *denoiser* is `denoiser(x, sigma, **net_kwargs) -> x0 estimate` with `sigma` a tensor of shape [B]
(k-diffusion convention). `ModelSampling.wrap(net_fn)` builds one from a raw network
`net_fn(x_in, timestep, **net_kwargs) -> output`:

- `FlowMatching`: x = (1−σ)·x0 + σ·ε, the net gets x and timestep σ·1000 and predicts the velocity
  v = ε − x0, so x0 = x − σ·v.
- `DiscreteEpsilon` / `DiscreteV`: x = x0 + σ·ε (the variance-exploding form of a DDPM: x = x_vp / sqrt(ᾱ)).
  The net gets x·c_in with c_in = 1/sqrt(σ²+1) (which is the DDPM sample x_vp) and the fractional training
  timestep of σ; it predicts ε (x0 = x − σ·ε) or v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
  (x0 = x/(σ²+1) − σ/sqrt(σ²+1)·v).

Samplers are pure functions `sample_x(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x`
that call `denoiser(x, sigma)` (conditioning is bound by the guidance wrappers). `callback(step, total, x,
denoised)` runs after each step; the node uses it for progress, previews and interruption. Deterministic
samplers accept `generator` only so that all samplers share one call signature.

Family-specific samplers take `flow=True` for flow-matching models (`sample` passes it):
- euler / ddim are the same update in both parametrisations (x0 + σ_next/σ·(x − x0)), so they need no flag.
- euler_ancestral: variance-exploding ancestral step for discrete models; for flow matching the
  rectified-flow form: a DDIM step down to σ_d = σ_next·(1 + (σ_next/σ − 1)·η), then rescale by
  (1−σ_next)/(1−σ_d) and add fresh noise so that the result has exactly the marginal of σ_next
  (signal coefficient 1−σ_next, noise std σ_next). η must be in [0, 1] for flow matching.
- dpmpp_2m: DPM-Solver++(2M) with α(σ) = 1 (discrete, in VE coordinates) or α(σ) = 1−σ (flow matching),
  λ = log(α/σ); the last step and the first step are first order (as diffusers' `lower_order_final`).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from ..errors import KineFlowError
from .noise import draw_noise
from .schedules import DiscreteSchedule, describe, is_valid_schedule

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape sigma [B] to broadcast over x [B, ...]."""
    return sigma.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------- model parametrisations
class FlowMatching:
    """Rectified flow: x = (1−σ)·x0 + σ·ε; the net predicts velocity ε − x0 at timestep σ·multiplier."""

    flow = True

    def __init__(self, multiplier: float = 1000.0):
        self.multiplier = float(multiplier)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def noise_scaling(self, sigma: float, noise: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy starting point at `sigma`: σ·ε + (1−σ)·latent (pure noise when latent is None)."""
        if latent is None:
            return noise * sigma
        return noise * sigma + latent.to(noise) * (1.0 - sigma)

    def wrap(self, net_fn: Callable[..., torch.Tensor]) -> Denoiser:
        def denoiser(x: torch.Tensor, sigma: torch.Tensor, **net_kwargs) -> torch.Tensor:
            velocity = net_fn(x, self.timestep(sigma).to(x.device), **net_kwargs).to(x.dtype)
            return x - _per_sample(sigma, x) * velocity

        return denoiser


class _Discrete(ABC):
    """Shared part of the discrete DDPM parametrisations (x = x0 + σ·ε, input scaled by 1/sqrt(σ²+1))."""

    flow = False

    def __init__(self, schedule: DiscreteSchedule | None = None):
        self.schedule = schedule if schedule is not None else DiscreteSchedule()

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.timestep(sigma.detach().cpu()).to(dtype=torch.float32)

    def noise_scaling(self, sigma: float, noise: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Starting point at `sigma`. Without a latent: pure noise of the DDPM (x_vp = ε), i.e. sqrt(1+σ²)·ε
        in these coordinates (diffusers' DDIM / DPM-Solver and "leading" Euler start there). With a latent
        (video-to-video): latent + σ·ε."""
        if latent is None:
            return noise * math.sqrt(1.0 + sigma * sigma)
        return latent.to(noise) + noise * sigma

    @abstractmethod
    def _output_to_x0(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Turn the raw net output at noise level `sigma` (broadcastable to x) into the x0 estimate."""

    def wrap(self, net_fn: Callable[..., torch.Tensor]) -> Denoiser:
        def denoiser(x: torch.Tensor, sigma: torch.Tensor, **net_kwargs) -> torch.Tensor:
            s = _per_sample(sigma, x)
            c_in = 1.0 / (s * s + 1.0).sqrt()
            output = net_fn(x * c_in, self.timestep(sigma).to(x.device), **net_kwargs).to(x.dtype)
            return self._output_to_x0(x, s, output)

        return denoiser


class DiscreteEpsilon(_Discrete):
    """Discrete DDPM whose net predicts the noise ε."""

    def _output_to_x0(self, x, sigma, output):
        return x - sigma * output


class DiscreteV(_Discrete):
    """Discrete DDPM whose net predicts v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0."""

    def _output_to_x0(self, x, sigma, output):
        var = sigma * sigma + 1.0
        return x / var - output * sigma / var.sqrt()


ModelSampling = FlowMatching | DiscreteEpsilon | DiscreteV


# --------------------------------------------------------------------------- samplers
def _steps(sigmas: torch.Tensor) -> list[tuple[float, float]]:
    values = [float(s) for s in sigmas]
    return list(zip(values[:-1], values[1:]))


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The per-sample σ [B] handed to the denoiser. It stays a CPU float32 tensor: samplers do their own
    arithmetic on Python floats, the parametrisations move σ to the latent's device where it meets the latent
    (`_per_sample`), and timesteps are computed from known values, which a dry run on `meta` needs."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32)


def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE dx/dσ = (x − x0)/σ."""
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser(x, _sigma_batch(sigma, x))
        x = x + (x - denoised) * ((sigma_next - sigma) / sigma)
        if callback is not None:
            callback(i, len(steps), x, denoised)
    return x


def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None):
    """Deterministic DDIM (η = 0): keep the predicted x0 and re-noise with the implied noise at σ_next.

    x_next = x0 + σ_next·(x − x0)/σ. For an x0-predicting denoiser this is the same update as Euler in both
    parametrisations; it is listed under its own name because users pick samplers by that name.
    """
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser(x, _sigma_batch(sigma, x))
        x = denoised + (x - denoised) * (sigma_next / sigma)
        if callback is not None:
            callback(i, len(steps), x, denoised)
    return x


def sample_euler_ancestral(denoiser, x, sigmas, *, eta=1.0, flow=False, generator=None, callback=None):
    """Euler ancestral: step below σ_next deterministically, then add fresh noise back up to σ_next."""
    if eta < 0 or (flow and eta > 1):
        raise KineFlowError(f"euler_ancestral eta must be in [0, {'1' if flow else 'inf'}), got {eta!r}")
    steps = _steps(sigmas)
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser(x, _sigma_batch(sigma, x))
        if sigma_next == 0:
            x = denoised
        elif flow:
            sigma_down = sigma_next * (1.0 + (sigma_next / sigma - 1.0) * eta)
            x = denoised + (x - denoised) * (sigma_down / sigma)
            scale = (1.0 - sigma_next) / (1.0 - sigma_down)
            renoise = math.sqrt(max(sigma_next**2 - (scale * sigma_down) ** 2, 0.0))
            x = x * scale + draw_noise(x.shape, generator, x.dtype, x.device) * renoise
        else:
            sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
            sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
            x = x + (x - denoised) * ((sigma_down - sigma) / sigma)
            x = x + draw_noise(x.shape, generator, x.dtype, x.device) * sigma_up
        if callback is not None:
            callback(i, len(steps), x, denoised)
    return x


def _half_log_snr(sigma: float, flow: bool) -> float:
    """λ = log(α/σ) with α = 1−σ (flow) or 1 (VE); ±inf at the ends of a flow schedule."""
    alpha = 1.0 - sigma if flow else 1.0
    if alpha <= 0:
        return -math.inf
    return math.log(alpha) - math.log(sigma)


def sample_dpmpp_2m(denoiser, x, sigmas, *, flow=False, generator=None, callback=None):
    """DPM-Solver++(2M): second-order multistep in λ = log(α/σ) using the previous x0 estimate."""
    steps = _steps(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(steps):
        denoised = denoiser(x, _sigma_batch(sigma, x))
        if sigma_next == 0:
            x = denoised
        else:
            h = _half_log_snr(sigma_next, flow) - _half_log_snr(sigma, flow)
            if old_denoised is None or math.isinf(h_last):
                d = denoised
            else:
                half_inv_r = h / (2.0 * h_last)
                d = denoised * (1.0 + half_inv_r) - old_denoised * half_inv_r
            alpha_next = 1.0 - sigma_next if flow else 1.0
            x = x * (sigma_next / sigma) - d * (alpha_next * math.expm1(-h))
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, len(steps), x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(
    model_sampling: ModelSampling,
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    sampler_name: str,
    latent: torch.Tensor | None = None,
    *,
    generator=None,
    callback: Callback | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Run a named sampler from noise (or from `latent` noised to sigmas[0] for denoise < 1).

    `denoiser(x, sigma)` is `model_sampling.wrap(net_fn)` with conditioning bound by a guidance wrapper
    (and optionally a context-window wrapper). `generator` feeds ancestral step noise (see noise.py).
    """
    if sampler_name not in SAMPLERS:
        raise KineFlowError(f"unknown sampler {sampler_name!r}; expected one of {', '.join(SAMPLERS)}")
    if not is_valid_schedule(sigmas):
        raise KineFlowError(
            f"expected at least 2 finite, non-increasing sigmas, all above 0 except the last, got {describe(sigmas)}"
        )
    if latent is not None and latent.shape != noise.shape:
        raise KineFlowError(f"latent shape {tuple(latent.shape)} does not match noise shape {tuple(noise.shape)}")
    fn = SAMPLERS[sampler_name]
    if "flow" in inspect.signature(fn).parameters:
        sampler_options["flow"] = model_sampling.flow
    x = model_sampling.noise_scaling(float(sigmas[0]), noise, latent)
    watch = FiniteWatch(callback)
    x = fn(denoiser, x, sigmas, generator=generator, callback=watch, **sampler_options)
    watch.finish()
    return x


class FiniteWatch:
    """A sampler callback that stops a run whose latent stops being finite (NaN or infinity), then calls `callback`.

    Cost per step: one reduction over the latent on its device (`isfinite().all()`, a bool) and one read of the
    previous step's bool. That read waits only for work a step old, so the device, busy with the current step, never
    idles for it; the last step's bool is read by `finish()`. A dry run's `meta` latent has no values to check."""

    def __init__(self, callback: Callback | None = None):
        self.callback = callback
        self.pending: tuple[int, int, torch.Tensor] | None = None

    def __call__(self, step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if not x.is_meta:
            previous, self.pending = self.pending, (step, total, torch.isfinite(x).all())
            self._check(previous)
        if self.callback is not None:
            self.callback(step, total, x, denoised)

    def finish(self) -> None:
        self._check(self.pending)

    @staticmethod
    def _check(entry) -> None:
        if entry is not None and not entry[2].item():
            step, total, _ = entry
            raise KineFlowError(
                f"sampling stopped: the latent holds NaN or infinite values after step {step + 1} of {total}. The "
                "model's output overflowed: try weight_dtype bf16 or fp32 instead of fp16, a lower cfg or shift, or "
                "another model file; nothing was saved")
