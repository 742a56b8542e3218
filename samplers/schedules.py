"""Noise schedules: which sigmas a sampler visits.

Every function returns a float32 tensor of `steps + 1` sigmas, decreasing, ending with 0 (k-diffusion
convention: the last entry is where the sampler lands, it is never passed to the model).

Flow matching (HunyuanVideo): a linear grid 1 → 0 (the last point dropped, as diffusers' HunyuanVideo
pipeline builds it), shifted with σ' = s·σ / (1 + (s−1)·σ), then 0 appended. This equals the sigmas of
diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)` after `set_timesteps(sigmas=np.linspace(1, 0, steps+1)[:-1])`.

Discrete DDPM (AnimateDiff / SD1.5): `DiscreteSchedule` holds the training table
σ_t = sqrt((1 − ᾱ_t) / ᾱ_t) for t = 0..N−1 and converts σ ↔ timestep by linear interpolation of log σ over
the index (both ways, so a round trip is exact). `discrete_sigmas` picks the timesteps with diffusers'
`timestep_spacing` rules ("linspace", "leading", "trailing"; `steps_offset` applies to "leading") and can
replace them with Karras sigmas (ρ = 7) spanning the same first and last sigma, as diffusers'
`use_karras_sigmas=True` does.

Beta schedule names follow diffusers: "linear" (β linear in t) and "scaled_linear" (√β linear in t).
"sqrt_linear" is the LDM/ComfyUI name of the schedule that is linear in β, so it equals diffusers' "linear"
(that is AnimateDiff's schedule: β 0.00085 → 0.012, linear). Beware: ComfyUI calls diffusers'
"scaled_linear" plain "linear".

`denoise < 1` (video-to-video) keeps the number of model calls: the schedule is built for
`int(steps / denoise)` steps and its last `steps + 1` sigmas are used (ComfyUI's rule), so sampling starts
part-way down the noise ladder.
"""

from __future__ import annotations

import torch

from ..errors import KineFlowError

BETA_SCHEDULES = ("linear", "scaled_linear", "sqrt_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
KARRAS_RHO = 7.0


def _check_steps(steps: int, denoise: float) -> int:
    if int(steps) != steps or steps < 1:
        raise KineFlowError(f"steps must be a whole number >= 1, got {steps!r}")
    if not 0.0 < denoise <= 1.0:
        raise KineFlowError(f"denoise must be in (0, 1], got {denoise!r}")
    # Steps of the full schedule whose tail we keep; at least `steps` so the tail exists.
    return max(int(steps), int(steps / denoise))


# --------------------------------------------------------------------------- flow matching
def flow_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift flow-matching sigmas towards the noisy end: σ' = s·σ / (1 + (s−1)·σ)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """`steps + 1` flow-matching sigmas from (shifted) 1 down to 0; see the module docstring for denoise."""
    if shift <= 0:
        raise KineFlowError(f"flow shift must be > 0, got {shift!r}")
    total = _check_steps(steps, denoise)
    grid = torch.linspace(1.0, 0.0, total + 1, dtype=torch.float64)[:-1]
    sigmas = torch.cat([flow_shift(grid, shift), grid.new_zeros(1)])
    return sigmas[-(int(steps) + 1):].to(torch.float32)


# --------------------------------------------------------------------------- discrete DDPM
def make_betas(
    schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Training betas (float64) for a named schedule; see the module docstring for the names."""
    n = int(num_train_timesteps)
    if schedule in ("linear", "sqrt_linear"):
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    raise KineFlowError(f"unknown beta schedule {schedule!r}; expected one of {', '.join(BETA_SCHEDULES)}")


class DiscreteSchedule:
    """The training noise table of a discrete DDPM model, in k-diffusion sigmas (x = x0 + σ·ε)."""

    def __init__(
        self,
        beta_schedule: str = "sqrt_linear",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
    ):
        self.beta_schedule = beta_schedule
        self.betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()  # float64, increasing in t
        self.log_sigmas = self.sigmas.log()
        self.num_train_timesteps = len(self.betas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """σ at a (possibly fractional) timestep, interpolating log σ; float64."""
        t = torch.as_tensor(timestep, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return log_sigma.exp()

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The fractional timestep whose σ is `sigma` (inverse of `sigma`), clamped to [0, N−1]; float64."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        # Index of the last table entry <= sigma, kept where a right neighbour exists.
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_train_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low + w


def spaced_timesteps(steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 1) -> torch.Tensor:
    """Decreasing timesteps (float64) chosen as diffusers' Euler-family schedulers choose them."""
    n = num_train_timesteps
    i = torch.arange(steps, dtype=torch.float64)
    if spacing == "linspace":
        return torch.linspace(0, n - 1, steps, dtype=torch.float64).flip(0)
    if spacing == "leading":
        return (i * (n // steps)).flip(0) + steps_offset
    if spacing == "trailing":
        return torch.round(n - i * (n / steps)) - 1
    raise KineFlowError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """`steps` sigmas from sigma_max to sigma_min, evenly spaced in σ^(1/ρ) (Karras et al. 2022); no final 0."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def discrete_sigmas(
    steps: int,
    schedule: DiscreteSchedule,
    spacing: str = "leading",
    karras: bool = False,
    steps_offset: int = 1,
    denoise: float = 1.0,
) -> torch.Tensor:
    """`steps + 1` sigmas for a discrete model; `steps_offset=1` is the SD1.5 / AnimateDiff scheduler config."""
    total = _check_steps(steps, denoise)
    timesteps = spaced_timesteps(total, schedule.num_train_timesteps, spacing, steps_offset)
    if float(timesteps.min()) < 0 or float(timesteps.max()) > schedule.num_train_timesteps - 1:
        raise KineFlowError(
            f"{spacing!r} spacing with steps_offset={steps_offset} and {total} steps gives timesteps outside "
            f"0..{schedule.num_train_timesteps - 1} (found {float(timesteps.min()):g}..{float(timesteps.max()):g})"
        )
    sigmas = schedule.sigma(timesteps)
    if karras:
        sigmas = karras_sigmas(total, float(sigmas[-1]), float(sigmas[0]))
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas[-(int(steps) + 1):].to(torch.float32)


def describe(sigmas: torch.Tensor) -> str:
    """One line for logs and errors: the count and range of a sigma schedule."""
    if sigmas.numel() == 0:
        return "empty schedule"
    return f"{sigmas.numel() - 1} steps, sigma {float(sigmas[0]):.4g} -> {float(sigmas[-1]):.4g}"


def is_valid_schedule(sigmas: torch.Tensor) -> bool:
    """True for a 1-D schedule of at least 2 finite, non-increasing sigmas, all > 0 except possibly the last."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        return False
    s = sigmas.double()
    return bool(torch.isfinite(s).all() and (s[:-1] > 0).all() and s[-1] >= 0 and (s[1:] <= s[:-1]).all())
