"""Regional torch.compile of the transformer's and the UNet's blocks (runtime/acceleration.py): compiled blocks give
eager's outputs under `full` and `blocks` offloading (the offload hooks stay outside the compiled code and the
swapped-in weights are read, recompiling nothing), and a failing compile falls back to eager.

Most tests compile with dynamo's `aot_eager` backend: the same graph capture, guards and tracing as inductor, in
seconds. Inductor itself generates and builds C++ kernels, about 70 s for the tiny transformer on a 2-core CPU with
a cold cache, so its test runs only with KINEFLOW_TEST_INDUCTOR=1; timings are in benchmarks/bench_hunyuan_dit.py.
"""

import logging
import os
import types

import pytest
import torch
from torch._dynamo.utils import counters

from kineflow.runtime import acceleration, host
from kineflow.runtime.animatediff import load_sd_checkpoint
from kineflow.runtime.video_models import load_video_model

CAPTURE_ONLY = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_compilations(monkeypatch):
    monkeypatch.setattr(acceleration, "_compiled", {})
    torch._dynamo.reset()
    counters.clear()


def _hunyuan(policy: str):
    return load_video_model("kineflow_tiny_dit.safetensors", offload=policy, resident_blocks=0)


def _hunyuan_run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cfg = model.net.config
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # right padding: KeyPadding into the blocks
    kwargs = dict(text_states=torch.randn(2, 6, cfg.text_states_dim, generator=g), text_mask=mask,
                  text_states_2=torch.randn(2, cfg.text_states_dim_2, generator=g), guidance=torch.tensor([6000.0] * 2))
    with model.running():
        return model.net_fn(torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([700.0, 700.0]), **kwargs)


def _sd15(policy: str):
    model = load_sd_checkpoint("kineflow_tiny_sd15.safetensors", offload=policy)[0]
    if policy == "blocks":  # the tiny UNet fits any budget: keep no block resident, each is fetched as it runs
        model.residency.fit(model.residency.rest.nbytes())
    return model


def _sd15_run(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with model.running():
        return model.net_fn(torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([500.0]),
                            torch.randn(1, 77, model.context_dim, generator=g))


FAMILIES = {"hunyuan": (_hunyuan, _hunyuan_run, lambda m: (m.net, m.residency)),
            "sd15": (_sd15, _sd15_run, lambda m: (m.unet, m.residency))}


def _compiled_matches_eager(family: str, policy: str, backend: str) -> None:
    load, run, parts = FAMILIES[family]
    expected = run(load(policy))
    model = load(policy)
    net, residency = parts(model)
    assert acceleration.compile_blocks(net, residency, backend=backend)
    weights_in_place = []  # at each compiled block's call, after the offload pre-hook

    def record(block, args):
        weights_in_place.append(not any(w.is_meta for w in block.parameters()))

    for block in net.compile_blocks():
        block.register_forward_pre_hook(record)
    first, second = run(model), run(model)  # the second run reuses the compiled code with weights swapped in again
    for out in (first, second):
        assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not counters["graph_break"], dict(counters["graph_break"])  # no offload hook was traced
    assert weights_in_place and all(weights_in_place)
    if policy == "blocks":
        assert residency.policy == "blocks" and not any(unit.resident for unit in residency.units)
        assert all(p.is_meta for block in net.offload_blocks() for p in block.parameters()), \
            "between runs the blocks' weights are back in the file"


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_blocks_give_the_eager_outputs_under_full_and_blocks_offload(family):
    for policy in ("full", "blocks"):
        _compiled_matches_eager(family, policy, CAPTURE_ONLY)
    if family == "hunyuan":  # one graph per block class, for both models: swapped-in weights recompile nothing
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


@pytest.mark.skipif(not os.environ.get("KINEFLOW_TEST_INDUCTOR"),
                    reason="builds C++ kernels (about 70 s with a cold cache on 2 CPU cores): KINEFLOW_TEST_INDUCTOR=1")
def test_inductor_compiled_transformer_gives_the_eager_outputs():
    for policy in ("full", "blocks"):
        _compiled_matches_eager("hunyuan", policy, "inductor")


def test_a_failing_compile_runs_eagerly_with_a_warning(monkeypatch, caplog):
    attempts = []

    def broken_compile(fn, **options):
        def compiled(*args, **kwargs):
            attempts.append(fn.__qualname__)
            raise RuntimeError("InductorError: CppCompileError: C++ compile error: g++ not found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    expected = _hunyuan_run(_hunyuan("full"))
    model = _hunyuan("full")
    acceleration.compile_blocks(model.net, model.residency)
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        torch.testing.assert_close(_hunyuan_run(model), expected, rtol=0, atol=0)
        torch.testing.assert_close(_hunyuan_run(model), expected, rtol=0, atol=0)
    assert sorted(attempts) == ["MMDoubleStreamBlock.forward", "MMSingleStreamBlock.forward"]  # once per class
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 2 and "running it eagerly" in warnings[0] and "g++ not found" in warnings[0]


def test_sequential_offloading_is_not_compiled(caplog):
    model = _hunyuan("sequential")
    with caplog.at_level(logging.WARNING, logger=acceleration.__name__):
        assert not acceleration.compile_blocks(model.net, model.residency)
    assert "not compiled: 'sequential' offloading" in caplog.text
    assert not any("forward" in vars(block) for block in model.net.compile_blocks())


def test_the_loaders_compile_option_and_the_run_default():
    def compiled(net):
        return all(isinstance(block.forward, types.MethodType) and "forward" in vars(block)
                   for block in net.compile_blocks())

    assert not compiled(_hunyuan("full").net)
    assert compiled(load_video_model("kineflow_tiny_dit.safetensors", compile="enabled").net)
    with host.configured(compile=True):
        assert compiled(load_sd_checkpoint("kineflow_tiny_sd15.safetensors")[0].unet)
        assert not compiled(load_sd_checkpoint("kineflow_tiny_sd15.safetensors", compile="disabled")[0].unet)


def test_a_lora_copy_keeps_its_blocks_compiled():
    model = load_video_model("kineflow_tiny_dit.safetensors", offload="blocks", compile="enabled")
    clone, _ = model.residency.copy_model()
    assert all(block.forward.__self__ is block for block in clone.compile_blocks())
