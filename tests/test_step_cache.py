"""Step caching (samplers/step_cache.py): skip decisions against hand-computed sequences, CFG batches, context
windows, denoise < 1, threshold 0 against no cache, the `meta` device, block offloading and the Step Cache node."""

import contextlib
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from device_check import one_device
from kineflow.errors import ModelFileError
from kineflow.runtime import cli, host
from kineflow.runtime.animatediff import apply_motion_module, load_motion_module, load_sd_checkpoint
from kineflow.runtime.executor import OutputCache
from kineflow.runtime.generation import empty_latent, encode_prompts, sample_video
from kineflow.runtime.video_models import load_text_encoders, load_video_model
from kineflow.samplers.context import ContextOptions, context_window_denoiser
from kineflow.samplers.guidance import make_cfg_denoiser
from kineflow.samplers.sampling import FlowMatching, sample
from kineflow.samplers.step_cache import (
    COEFFICIENTS_METADATA_KEY, FIRST_BLOCK, RELEASED_TEACACHE_COEFFICIENTS, StepCacheOptions, StepCacheRun, teacache,
    teacache_coefficients)

ROOT = Path(__file__).resolve().parent.parent
HV_PROMPT = "a red circle moves to the right on a blue background"
AD_PROMPT = "a green square moves up on a white background"


# --------------------------------------------------------------------------- decisions
def _decisions(criterion, threshold: float, probes: list[list[float]]) -> list[bool]:
    """Whether each step ran the blocks, for a model whose probe at step k holds `probes[k]` (a value per item)."""
    run = StepCacheRun(StepCacheOptions(threshold), criterion, steps=len(probes))
    ran = []

    def net(x, timestep, step_cache):
        residual = step_cache.reuse(torch.tensor(probes[run.step]).reshape(-1, 1).expand(-1, 3))
        ran.append(residual is None)
        if residual is None:
            step_cache.store(torch.zeros_like(x))
        return x

    denoiser = run.wrap(run.bind(net))
    for _ in probes:
        denoiser(torch.zeros(len(probes[0]), 2), torch.ones(1))
    assert run.calls == len(probes) and run.skips == ran.count(False)
    return ran


PROBES = [[1.0], [1.1], [1.2], [1.3], [1.6], [1.7], [1.8], [1.9]]


def test_teacache_sums_rescaled_step_to_step_changes_until_the_threshold():
    # Changes from step to step: .1, .0909, .0833, .2308, .0625, .0588, .0556; rescaled by P(x) = 2x and summed
    # since the last full step: .2 skip, .382 skip, .548 run; .462 skip, .586 run; .118 skip; the last step runs.
    assert _decisions(teacache((2.0, 0.0)), 0.5, PROBES) == [True, False, False, True, False, True, False, True]


def test_first_block_cache_compares_with_the_last_full_step():
    # Against the probe of the last step that ran: 1.1 vs 1 (.1) skip, 1.2 vs 1 (.2) run; 1.3 vs 1.2 (.083) and
    # 1.35 vs 1.2 (.125) skip, 1.45 (.208) run; 1.5 vs 1.45 (.034) skip; the last step runs.
    probes = [[1.0], [1.1], [1.2], [1.3], [1.35], [1.45], [1.5], [1.6]]
    assert _decisions(FIRST_BLOCK, 0.15, probes) == [True, False, True, False, False, True, False, True]


def test_a_batch_runs_the_blocks_when_any_item_changed_enough():
    # Item 1 changes by .2 at step 1 (the batch mean only .1): the blocks run; then nothing changes.
    probes = [[1.0, 1.0], [1.0, 1.2], [1.0, 1.2], [1.0, 1.2]]
    assert _decisions(FIRST_BLOCK, 0.15, probes) == [True, True, False, True]


def test_threshold_zero_never_skips_and_the_polynomial_is_never_negative():
    assert _decisions(FIRST_BLOCK, 0.0, [[1.0]] * 5) == [True] * 5
    # P(x) = x - .05: no change counts 0 (not -.05), so the change of .2 at step 3 (.15) reaches .12.
    probes = [[1.0], [1.0], [1.0], [1.2], [1.2]]
    assert _decisions(teacache((1.0, -0.05)), 0.12, probes) == [True, False, False, True, True]


def test_meta_probes_always_run_the_blocks():
    run = StepCacheRun(StepCacheOptions(1.0), FIRST_BLOCK, steps=5)
    run.step = 2
    stream = run.bind(lambda x, t, step_cache: step_cache)(None, None)
    stream.store(torch.zeros(1, device="meta"))
    assert stream.reuse(torch.zeros(1, 3, device="meta")) is None
    assert stream.reuse(torch.zeros(1, 3, device="meta")) is None


# --------------------------------------------------------------------------- a toy model with the models' contract
class Toy:
    """Probe: the timestep (the same for every batch item). Blocks: add sin(h * c + t), c the conditioning."""

    def __call__(self, x, timestep, c, step_cache=None):
        residual = None
        if step_cache is not None:
            residual = step_cache.reuse(timestep.reshape(-1, 1).expand(x.shape[0], 4).float() + 1.0)
        if residual is None:
            residual = torch.sin(x * c.reshape(-1, *[1] * (x.ndim - 1)) + timestep.reshape(-1, *[1] * (x.ndim - 1)))
            if step_cache is not None:
                step_cache.store(residual)
        return x + residual


def _toy_sample(batched: bool, threshold: float | None, steps: int = 10) -> tuple[torch.Tensor, StepCacheRun | None]:
    ms, toy = FlowMatching(multiplier=1.0), Toy()
    run = None if threshold is None else StepCacheRun(StepCacheOptions(threshold), FIRST_BLOCK, steps)
    net = toy if run is None else run.bind(toy)
    denoiser = make_cfg_denoiser(ms.wrap(net), {"c": torch.tensor([1.5])}, {"c": torch.tensor([-0.5])}, 3.0, batched)
    if run is not None:
        denoiser = run.wrap(denoiser)
    noise = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return sample(ms, denoiser, noise, torch.linspace(1.0, 0.0, steps + 1), "euler"), run


def test_cfg_in_one_batch_or_two_calls_keeps_each_branch_its_own_residual():
    """Batched, each item reuses its own residual; in two calls, each call has a state of its own. Both give the same
    video (the probes agree, so do the decisions), which skipping changed."""
    batched, run = _toy_sample(True, 0.3)
    separate, run2 = _toy_sample(False, 0.3)
    uncached, _ = _toy_sample(True, None)
    assert run.skips > 0 and run2.skips == 2 * run.skips
    assert torch.equal(batched, separate)
    assert not torch.equal(batched, uncached)


def test_each_context_window_keeps_its_own_state():
    """Step 1 skips: each window gets back the residual it stored at step 0 (sin of its own frames then)."""
    run = StepCacheRun(StepCacheOptions(1.0), FIRST_BLOCK, steps=3)

    def net(x, sigma, step_cache):
        residual = step_cache.reuse(torch.ones(x.shape[0], 4))
        if residual is None:
            residual = torch.sin(x)
            step_cache.store(residual)
        return x + residual

    options = ContextOptions(length=4, overlap=2, schedule="static")  # windows [0..3], [2..5], [4..7]
    denoiser = run.wrap(context_window_denoiser(run.bind(net), options))
    x0, x1 = torch.randn(2, 1, 2, 8, 2, 2, generator=torch.Generator().manual_seed(1))
    denoiser(x0, torch.ones(1))
    out = denoiser(x1, torch.ones(1))
    assert run.skips == 3
    torch.testing.assert_close(out, x1 + torch.sin(x0))


# --------------------------------------------------------------------------- the shipped models
@pytest.fixture(scope="module")
def hunyuan():
    model = load_video_model("kineflow_tiny_dit.safetensors")
    text = load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors")
    return model, encode_prompts(text, HV_PROMPT, "")


@pytest.fixture(scope="module")
def animatediff():
    model, _, text = load_sd_checkpoint("kineflow_tiny_sd15.safetensors")
    model = apply_motion_module(model, load_motion_module("kineflow_tiny_mm.safetensors"))
    return model, encode_prompts(text, AD_PROMPT, "")


HV_SAMPLE = dict(seed=1, steps=6, cfg=2.0, shift=3.0, embedded_guidance=6.0, sampler_name="euler")
AD_SAMPLE = dict(seed=1, steps=6, cfg=4.0, shift=1.0, embedded_guidance=6.0, sampler_name="euler")
WINDOWS = ContextOptions(length=6, overlap=2)


@contextlib.contextmanager
def _full_evaluations(net, last_block):
    """Yields a list that gets, per model call inside, whether its last block ran (a full evaluation)."""
    ran = []
    hooks = [net.register_forward_pre_hook(lambda module, args: ran.append(False)),
             last_block.register_forward_hook(lambda module, args, out: ran.__setitem__(-1, True))]
    try:
        yield ran
    finally:
        for hook in hooks:
            hook.remove()


def test_hunyuan_video_threshold_zero_is_bit_identical_to_no_cache_and_the_cache_skips(hunyuan):
    model, cond = hunyuan
    latent = empty_latent("hunyuan_video", 32, 32, 5, 1)
    plain = sample_video(model, cond, latent, **HV_SAMPLE)["samples"]
    assert torch.equal(sample_video(model, cond, latent, step_cache=StepCacheOptions(0.0), **HV_SAMPLE)["samples"],
                       plain)
    cached = sample_video(model, cond, latent, step_cache=StepCacheOptions(1.0), **HV_SAMPLE)["samples"]
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()


def test_hunyuan_video_denoise_below_one_runs_the_first_and_last_of_its_steps(hunyuan):
    model, cond = hunyuan
    with _full_evaluations(model.net, model.net.single_blocks[-1]) as ran:
        sample_video(model, cond, empty_latent("hunyuan_video", 32, 32, 5, 1), denoise=0.5,
                     step_cache=StepCacheOptions(1.0), **{**HV_SAMPLE, "steps": 12, "cfg": 1.0})
    assert len(ran) == len(model.sigmas(12, 3.0, 0.5)) - 1 == 12
    assert ran[0] and ran[-1] and not all(ran), ran


def test_animatediff_with_context_windows_threshold_zero_is_bit_identical_and_the_cache_skips(animatediff, caplog):
    model, cond = animatediff
    latent = empty_latent("sd15", 32, 32, 10, 1)  # two windows of 6 frames
    plain = sample_video(model, cond, latent, context=WINDOWS, **AD_SAMPLE)["samples"]
    zero = sample_video(model, cond, latent, context=WINDOWS, step_cache=StepCacheOptions(0.0), **AD_SAMPLE)
    assert torch.equal(zero["samples"], plain)
    with caplog.at_level(logging.INFO, logger="kineflow.runtime.generation"):
        cached = sample_video(model, cond, latent, context=WINDOWS, step_cache=StepCacheOptions(0.3), **AD_SAMPLE)
    skips, calls = map(int, caplog.records[-1].getMessage().split("blocks in ")[1].split(" calls")[0].split(" of "))
    assert calls == 2 * 6 and 0 < skips <= 2 * 4  # two windows a step; the first and last steps run
    assert not torch.equal(cached["samples"], plain) and torch.isfinite(cached["samples"]).all()


# --------------------------------------------------------------------------- devices and offloading
def _hunyuan_workflow(steps: int = 4) -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "text_to_video.json").read_text())
    prompt["5"]["inputs"].update(width=32, height=32, frames=9)
    prompt["6"]["inputs"].update(steps=steps, cfg=2.0)
    prompt["20"] = {"class_type": "KineFlowStepCache", "inputs": {"threshold": 0.5}}
    prompt["6"]["inputs"]["step_cache"] = ["20", 0]
    return prompt


def _animatediff_workflow() -> dict:
    prompt = json.loads((ROOT / "workflows" / "api" / "animatediff_tiny.json").read_text())
    prompt["5"]["inputs"].update(width=32, height=32, frames=10)
    prompt["6"]["inputs"].update(steps=4)
    prompt["20"] = {"class_type": "KineFlowStepCache", "inputs": {"threshold": 0.5}}
    prompt["21"] = {"class_type": "KineFlowContextOptions", "inputs": {"length": 6, "overlap": 2, "stride": 1,
                                                                       "schedule": "uniform", "fuse_method": "pyramid"}}
    prompt["6"]["inputs"].update(step_cache=["20", 0], context_options=["21", 0])
    return prompt


@pytest.mark.parametrize("workflow", [_hunyuan_workflow, _animatediff_workflow], ids=["hunyuan", "animatediff"])
def test_step_cache_runs_on_the_compute_device(workflow, tmp_path):
    from kineflow.runtime.executor import run_workflow

    out_dir = tmp_path / "out"
    with host.configured(device="meta", output_dir=out_dir), one_device() as mode:
        run_workflow(workflow(), cache=OutputCache(), output_dir=out_dir)
    assert mode.ops_on.get("meta", 0) > 100


def test_skipped_blocks_keep_block_offloading_exact_and_prefetching(animatediff):
    """The UNet's first block is two offload units (conv_in, then the first resnet); a step that skips the rest goes
    back to the first unit from the second, so the order of units changes between steps. Frames stay those of the
    fully resident model, and a wrong guess of the next unit costs one fetch that was not made ahead."""
    _, cond = animatediff
    latent = empty_latent("sd15", 32, 32, 8, 1)
    settings = dict(step_cache=StepCacheOptions(0.3), **{**AD_SAMPLE, "steps": 10})
    reference = sample_video(animatediff[0], cond, latent, **settings)["samples"]

    model, _, _ = load_sd_checkpoint("kineflow_tiny_sd15.safetensors", offload="blocks")
    model = apply_motion_module(model, load_motion_module("kineflow_tiny_mm.safetensors"))
    residency = model.residency
    residency.fit(0)  # no unit stays resident: each is read from the file when it runs, or ahead of it
    fetched_ahead = []
    bring = residency._bring
    residency._bring = lambda unit: fetched_ahead.append(unit.pending is not None or unit.on_device) or bring(unit)
    with _full_evaluations(model.unet, model.unet.output_blocks[-1][0]) as ran:
        assert torch.equal(sample_video(model, cond, latent, **settings)["samples"], reference)
    order_changes = sum(1 for a, b in zip(ran, ran[1:]) if a != b)  # a full pass after a skipping one, or before
    assert order_changes > 0
    # Read as they run: the first pass's units, the second pass's first (which unit follows the last is learnt then)
    # and one unit per change of order. (Keeping the wrong guess pending would cost the skipping passes all theirs.)
    assert fetched_ahead.count(False) <= len(residency.units) + 1 + order_changes, fetched_ahead


def test_compiled_blocks_take_the_probe_call_and_give_the_eager_video(hunyuan, monkeypatch):
    """The probe is a call of the first (compiled) double block: it traces a graph of its own, breaks none."""
    from torch._dynamo.utils import counters

    from kineflow.runtime import acceleration

    monkeypatch.setattr(acceleration, "_compiled", {})
    torch._dynamo.reset()
    counters.clear()
    eager, cond = hunyuan
    latent = empty_latent("hunyuan_video", 32, 32, 5, 1)
    settings = dict(step_cache=StepCacheOptions(1.0), **HV_SAMPLE)
    expected = sample_video(eager, cond, latent, **settings)["samples"]
    model = load_video_model("kineflow_tiny_dit.safetensors")
    assert acceleration.compile_blocks(model.net, model.residency, backend="aot_eager")
    out = sample_video(model, cond, latent, **settings)["samples"]
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the node and the polynomial
def test_a_workflow_with_step_cache_runs_through_kineflow_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("kineflow.runtime.executor._DEFAULT_CACHE", OutputCache())
    path = tmp_path / "step_cache.json"
    path.write_text(json.dumps(_hunyuan_workflow(steps=6)))
    with caplog.at_level(logging.INFO, logger="kineflow.runtime.generation"):
        assert cli.main(["run", str(path), "--output-dir", str(tmp_path / "out")]) == 0
    assert list((tmp_path / "out").rglob("*.mp4"))
    assert any("step cache (teacache, threshold 0.5) skipped the model's blocks in" in r.getMessage()
               for r in caplog.records)


def test_eval_samples_with_the_step_cache_it_is_given(capsys):
    assert cli.main(["eval", "-n", "1", "--steps", "4", "--width", "32", "--step-cache", "0.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["step_cache"] == 0.1
    assert cli.main(["eval", "-n", "1", "--step-cache", "-1"]) == 2
    assert "threshold must be a finite number >= 0" in capsys.readouterr().err


def test_the_shipped_transformer_carries_its_fitted_polynomial_and_others_get_the_published_one():
    from kineflow.models.checkpoints import read_header

    header = read_header(ROOT / "weights" / "diffusion_models" / "kineflow_tiny_dit.safetensors")
    fitted = teacache_coefficients(header.metadata, "hunyuan_video", "tiny")
    assert len(fitted) == 5 and fitted != RELEASED_TEACACHE_COEFFICIENTS["hunyuan_video"]
    assert load_video_model("kineflow_tiny_dit.safetensors").step_cache_criterion == teacache(fitted)
    assert teacache_coefficients({}, "hunyuan_video", "x") == RELEASED_TEACACHE_COEFFICIENTS["hunyuan_video"]
    with pytest.raises(ModelFileError, match=COEFFICIENTS_METADATA_KEY):
        teacache_coefficients({COEFFICIENTS_METADATA_KEY: '{"coefficients": ["nan"]}'}, "hunyuan_video", "x")
    assert math.isclose(float(teacache(fitted).rescale(torch.tensor([0.0]))), max(fitted[-1], 0.0))


def test_step_cache_options_are_checked():
    with pytest.raises(Exception, match="threshold must be a finite number >= 0"):
        StepCacheOptions(-0.1)
    with pytest.raises(Exception, match="threshold must be a finite number >= 0"):
        StepCacheOptions(float("nan"))
