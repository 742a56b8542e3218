"""Schedules, parametrisations, samplers, guidance and seeded noise; parity against diffusers' schedulers.

The "model" is a fixed analytic function of the model input and timestep, so any difference in sigmas,
timesteps, input scaling, prediction conversion or update rule shows up in the final latent.
"""

import numpy as np
import pytest
import torch

from kineflow.errors import KineFlowError
from kineflow.samplers import guidance, noise, sampling, schedules

ANIMATEDIFF_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="linear")
SHAPE = (1, 2, 3, 4, 4)  # [B, C, T, H, W]
TOL = 1e-4


def analytic_net(x_in, timestep):
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1, *([1] * (x_in.ndim - 1)))
    return 0.7 * torch.tanh(x_in) + 0.3 * torch.sin(t / 157.0 + 0.5 * x_in)


def start_noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def diffusers_loop(scheduler, x, **step_kwargs):
    for t in scheduler.timesteps:
        out = analytic_net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, return_dict=False, **step_kwargs)[0]
    return x


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name,diffusers_name", [("linear", "linear"), ("sqrt_linear", "linear"),
                                                 ("scaled_linear", "scaled_linear")])
def test_beta_schedules_match_diffusers(name, diffusers_name):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=diffusers_name)
    ours = schedules.DiscreteSchedule(name)
    assert max_err(ours.betas, ref.betas) < 1e-8  # diffusers computes them in float32
    assert max_err(ours.alphas_cumprod, ref.alphas_cumprod) < 1e-6


def test_sigma_timestep_round_trip_and_clamping():
    sched = schedules.DiscreteSchedule()
    t = torch.tensor([0.0, 1.0, 10.25, 500.5, 998.9, 999.0], dtype=torch.float64)
    assert max_err(sched.timestep(sched.sigma(t)), t) < 1e-9
    assert float(sched.timestep(torch.tensor(sched.sigma_min / 10))) == 0.0
    assert float(sched.timestep(torch.tensor(sched.sigma_max * 10))) == 999.0
    assert float(sched.sigma(torch.tensor(500.0))) == pytest.approx(float(sched.sigmas[500]), rel=1e-12)


def test_flow_sigmas_match_hunyuan_pipeline_setup():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in [(10, 7.0), (6, 1.0), (5, 17.0)]:
        ref = FlowMatchEulerDiscreteScheduler(shift=shift)
        ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
        ours = schedules.flow_sigmas(steps, shift)
        assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
        assert max_err(ours, ref.sigmas) < 1e-6
        assert max_err(sampling.FlowMatching().timestep(ours[:-1]), ref.timesteps) < 1e-3


def test_denoise_takes_the_tail_of_a_longer_schedule():
    steps = 6
    tail = schedules.flow_sigmas(steps, 7.0, denoise=0.5)
    assert tail.shape == (steps + 1,)
    assert torch.equal(tail, schedules.flow_sigmas(12, 7.0)[-(steps + 1):])
    assert 0.0 < float(tail[0]) < 1.0 and float(tail[-1]) == 0.0
    sched = schedules.DiscreteSchedule()
    dtail = schedules.discrete_sigmas(steps, sched, "trailing", denoise=0.75)
    assert torch.equal(dtail, schedules.discrete_sigmas(8, sched, "trailing")[-(steps + 1):])
    with pytest.raises(KineFlowError, match="denoise"):
        schedules.flow_sigmas(steps, 7.0, denoise=0.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("karras", [False, True])
def test_discrete_sigmas_match_diffusers_euler(spacing, karras):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**ANIMATEDIFF_BETAS, steps_offset=1, timestep_spacing=spacing,
                                 use_karras_sigmas=karras)
    ref.set_timesteps(9)
    sched = schedules.DiscreteSchedule("sqrt_linear")
    ours = schedules.discrete_sigmas(9, sched, spacing, karras=karras)
    assert max_err(ours, ref.sigmas) < TOL
    assert max_err(sched.timestep(ours[:-1]), ref.timesteps) < 2e-3  # float32 ᾱ in diffusers vs float64 here


# --------------------------------------------------------------------------- sampler parity
def test_flow_euler_matches_flow_match_euler_discrete():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps, shift = 8, 7.0
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    expected = start_noise()
    for t in ref.timesteps:
        expected = ref.step(analytic_net(expected, t), t, expected, return_dict=False)[0]
    ms = sampling.FlowMatching()
    got = sampling.sample(ms, ms.wrap(analytic_net), start_noise(), schedules.flow_sigmas(steps, shift), "euler")
    assert max_err(got, expected) < TOL


def test_flow_dpmpp_2m_matches_diffusers_flow_dpm_solver():
    from diffusers import DPMSolverMultistepScheduler

    steps = 7
    sigmas = schedules.flow_sigmas(steps, 5.0, denoise=0.9)
    ref = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=5.0,
                                      algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
    ref.set_timesteps(steps)
    ref.sigmas, ref.timesteps = sigmas.clone(), sigmas[:-1] * 1000  # drive it with our schedule
    latent = torch.linspace(-1, 1, int(np.prod(SHAPE))).reshape(SHAPE)
    x0 = float(sigmas[0]) * start_noise() + (1 - float(sigmas[0])) * latent
    expected = diffusers_loop(ref, x0.clone())
    ms = sampling.FlowMatching()
    got = sampling.sample(ms, ms.wrap(analytic_net), start_noise(), sigmas, "dpmpp_2m", latent=latent)
    assert max_err(got, expected) < TOL


def _discrete(prediction):
    sched = schedules.DiscreteSchedule("sqrt_linear")
    ms = sampling.DiscreteEpsilon(sched) if prediction == "epsilon" else sampling.DiscreteV(sched)
    return sched, ms, ms.wrap(analytic_net)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(prediction):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(**ANIMATEDIFF_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=True,
                        prediction_type=prediction)
    ref.set_timesteps(10)
    expected = diffusers_loop(ref, start_noise() * ref.init_noise_sigma, eta=0.0)
    sched, ms, denoiser = _discrete(prediction)
    sigmas = schedules.discrete_sigmas(10, sched, "leading")
    assert max_err(sched.timestep(sigmas[:-1]), ref.timesteps) < 1e-3
    got = sampling.sample(ms, denoiser, start_noise(), sigmas, "ddim")
    assert max_err(got, expected) < TOL


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,karras", [("leading", False), ("leading", True), ("linspace", True)])
def test_euler_matches_diffusers(prediction, spacing, karras):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**ANIMATEDIFF_BETAS, steps_offset=1, timestep_spacing=spacing,
                                 use_karras_sigmas=karras, prediction_type=prediction)
    ref.set_timesteps(8)
    expected = diffusers_loop(ref, start_noise() * ref.init_noise_sigma)
    sched, ms, denoiser = _discrete(prediction)
    sigmas = schedules.discrete_sigmas(8, sched, spacing, karras=karras)
    got = sampling.sample_euler(denoiser, start_noise() * float(ref.init_noise_sigma), sigmas)
    assert max_err(got, expected) < TOL
    if spacing == "leading":  # sample() starts from sqrt(1+σ²)·ε, diffusers' "leading" init_noise_sigma
        assert max_err(sampling.sample(ms, denoiser, start_noise(), sigmas, "euler"), expected) < TOL


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers_with_the_same_generator(prediction):
    from diffusers import EulerAncestralDiscreteScheduler

    ref = EulerAncestralDiscreteScheduler(**ANIMATEDIFF_BETAS, steps_offset=1, timestep_spacing="leading",
                                          prediction_type=prediction)
    ref.set_timesteps(8)
    expected = diffusers_loop(ref, start_noise() * ref.init_noise_sigma,
                              generator=torch.Generator().manual_seed(7))
    sched, ms, denoiser = _discrete(prediction)
    sigmas = schedules.discrete_sigmas(8, sched, "leading")
    got = sampling.sample(ms, denoiser, start_noise(), sigmas, "euler_ancestral",
                          generator=torch.Generator().manual_seed(7))
    assert max_err(got, expected) < TOL
    other = sampling.sample(ms, denoiser, start_noise(), sigmas, "euler_ancestral",
                            generator=torch.Generator().manual_seed(8))
    assert max_err(other, expected) > 1e-2  # the step noise really enters


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers_multistep_midpoint(prediction):
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(**ANIMATEDIFF_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                      solver_type="midpoint", timestep_spacing="trailing",
                                      prediction_type=prediction)
    ref.set_timesteps(8)
    expected = diffusers_loop(ref, start_noise() * ref.init_noise_sigma)
    sched, ms, denoiser = _discrete(prediction)
    sigmas = schedules.discrete_sigmas(8, sched, "trailing")
    assert max_err(sigmas, ref.sigmas) < TOL
    got = sampling.sample(ms, denoiser, start_noise(), sigmas, "dpmpp_2m")
    assert max_err(got, expected) < TOL


# --------------------------------------------------------------------------- flow ancestral, callbacks, errors
def test_flow_euler_ancestral_keeps_the_marginal_and_reduces_to_ddim_at_eta_0():
    sigmas = schedules.flow_sigmas(6, 3.0)
    x0_true = torch.full(SHAPE, 0.5)
    oracle = lambda x, sigma: x0_true  # noqa: E731  a perfect denoiser for a point-mass data distribution
    gen = torch.Generator().manual_seed(3)
    eta0 = sampling.sample_euler_ancestral(oracle, start_noise(), sigmas, eta=0.0, flow=True, generator=gen)
    ddim = sampling.sample_ddim(oracle, start_noise(), sigmas)
    assert max_err(eta0, ddim) < 1e-6
    # Stop one step early: x must be (1-σ)·x0 + σ·ε with unit-variance ε, i.e. std σ around (1-σ)·x0.
    big = (4096,)
    x = sampling.sample_euler_ancestral(lambda x, s: torch.full(big, 0.5), torch.randn(big, generator=gen),
                                        sigmas[:-1], eta=1.0, flow=True, generator=gen)
    s_last = float(sigmas[-2])
    assert float(x.mean()) == pytest.approx((1 - s_last) * 0.5, abs=4 * s_last / 64)
    assert float(x.std()) == pytest.approx(s_last, rel=0.05)
    with pytest.raises(KineFlowError, match="eta"):
        sampling.sample_euler_ancestral(oracle, start_noise(), sigmas, eta=1.5, flow=True)


def test_callback_sees_every_step_and_sample_validates_inputs():
    calls = []
    ms = sampling.FlowMatching()
    sigmas = schedules.flow_sigmas(4, 2.0)
    sampling.sample(ms, ms.wrap(analytic_net), start_noise(), sigmas, "dpmpp_2m",
                    callback=lambda i, n, x, d: calls.append((i, n, x.shape, d.shape)))
    assert [c[:2] for c in calls] == [(i, 4) for i in range(4)] and calls[0][2] == calls[0][3] == SHAPE
    with pytest.raises(KineFlowError, match="unknown sampler"):
        sampling.sample(ms, ms.wrap(analytic_net), start_noise(), sigmas, "heun")
    with pytest.raises(KineFlowError, match="non-increasing"):
        sampling.sample(ms, ms.wrap(analytic_net), start_noise(), sigmas.flip(0), "euler")
    assert set(sampling.SAMPLERS) == {"euler", "euler_ancestral", "ddim", "dpmpp_2m"}


# --------------------------------------------------------------------------- guidance
def _recording_denoiser(calls):
    def denoiser(x, sigma, context, scale=1.0):
        calls.append(x.shape[0])
        return x * 0.5 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * scale + sigma.view(-1, 1, 1, 1, 1)
    return denoiser


def test_cfg_batches_when_possible_and_matches_two_pass_formula():
    x, sigma = start_noise().repeat(2, 1, 1, 1, 1), torch.tensor([3.0, 3.0])
    cond = {"context": torch.ones(1, 5, 8), "scale": 2.0}
    uncond = {"context": torch.zeros(1, 5, 8), "scale": 2.0}
    calls = []
    d = _recording_denoiser(calls)
    guided = guidance.make_cfg_denoiser(d, cond, uncond, 7.5)(x, sigma)
    assert calls == [4]  # one batched call of cond + uncond
    expected = d(x, sigma, **uncond) + 7.5 * (d(x, sigma, **cond) - d(x, sigma, **uncond))
    assert max_err(guided, expected) < 1e-5
    assert max_err(guidance.cfg(lambda x, s: d(x, s, **cond), lambda x, s: d(x, s, **uncond), 7.5)(x, sigma),
                   expected) < 1e-5

    calls.clear()  # different token counts cannot be stacked: two calls, same result
    uncond_long = {"context": torch.zeros(1, 7, 8), "scale": 2.0}
    two_pass = guidance.make_cfg_denoiser(d, cond, uncond_long, 7.5)(x, sigma)
    assert calls == [2, 2] and max_err(two_pass, expected) < 1e-5

    calls.clear()  # scale 1: the uncond pass is skipped
    single = guidance.make_cfg_denoiser(d, cond, uncond, 1.0)(x, sigma)
    assert calls == [2] and max_err(single, d(x, sigma, **cond)) < 1e-7


def test_embedded_guidance_is_a_model_input():
    base = {"context": torch.ones(1, 2, 3)}
    cond = guidance.embedded_guidance(base, 6.0, batch_size=2)
    assert cond["guidance"].tolist() == [6.0, 6.0] and "guidance" not in base
    seen = {}
    guidance.make_cfg_denoiser(lambda x, s, **kw: seen.update(kw) or x, cond, None, 1.0)(
        torch.zeros(2, 1, 1, 1, 1), torch.ones(2))
    assert seen["guidance"].tolist() == [6.0, 6.0]


# --------------------------------------------------------------------------- noise
def test_seeded_noise_is_reproducible_and_batch_independent():
    shape = (3, 4, 2, 5, 5)
    a = noise.seeded_noise(shape, 42)
    assert a.dtype == torch.float32 and a.shape == shape
    assert torch.equal(a, noise.seeded_noise(shape, 42))
    assert not torch.equal(a, noise.seeded_noise(shape, 43))
    for i in range(3):  # entry i == a single run with seed 42 + i, whatever the batch size
        assert torch.equal(a[i], noise.seeded_noise((1, *shape[1:]), 42 + i)[0])
    assert torch.equal(noise.seeded_noise(shape, 2**64 - 1)[1], noise.seeded_noise((1, *shape[1:]), 0)[0])
    half = noise.seeded_noise(shape, 42, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())


def test_step_generators_are_per_entry_and_distinct_from_initial_noise():
    shape = (2, 3, 4)
    steps = noise.draw_noise(shape, noise.step_generators(5, 2))
    assert torch.equal(steps[1], noise.draw_noise((1, 3, 4), noise.step_generators(6, 1))[0])
    for seed in range(3, 9):
        assert not torch.allclose(steps[0], noise.seeded_noise((1, 3, 4), seed)[0])
    with pytest.raises(KineFlowError, match="one noise generator per batch entry"):
        noise.draw_noise(shape, noise.step_generators(5, 3))
