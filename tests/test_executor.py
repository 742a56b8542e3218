"""Executor: dependency order, hidden inputs, ui results, caching, interruption, failures."""

import copy
import io

import pytest
import torch

from kineflow.runtime import host
from kineflow.errors import InputFileError, InterruptedRun
from kineflow.runtime.executor import (
    NodeExecutionError,
    OutputCache,
    WorkflowInvalid,
    execute,
    execution_order,
    run_workflow,
)
from kineflow.runtime.workflow import load_workflow

from conftest import DATA_DIR

WORKFLOWS = DATA_DIR / "workflows"


def _prompt():
    return copy.deepcopy(load_workflow(WORKFLOWS / "basic_api.json"))


def _names(calls):
    return [name for name, _ in calls]


def test_runs_needed_nodes_in_dependency_order(fixture_nodes, calls):
    prompt = _prompt()
    prompt["0"] = {"class_type": "TSave", "inputs": {"images": ["2", 0], "filename_prefix": "first"}}
    stream = io.StringIO()
    results = execute(prompt, fixture_nodes, progress_stream=stream)
    assert _names(calls) == ["TImage", "TNoise", "TSave", "TSave"]  # node 4 is not needed, never runs
    assert set(results) == {"0", "1", "2", "3"}
    assert results["3"]["ui"] == {"images": [{"filename": "clip_00001.png"}]}
    assert results["2"]["outputs"][1] == 42
    assert results["1"]["outputs"][0].shape == (1, 6, 8, 3)
    assert stream.getvalue().splitlines()[0] == "[1/4] node 1 TImage"


def test_output_matches_direct_computation(fixture_nodes, calls):
    results = execute(_prompt(), fixture_nodes, progress_stream=io.StringIO())
    image = torch.zeros(1, 6, 8, 3)
    image[..., 1] = 1.0
    expected = image + 0.25 * torch.rand(image.shape, generator=torch.Generator().manual_seed(42))
    assert torch.equal(results["2"]["outputs"][0], expected)


def test_hidden_inputs(fixture_nodes, calls):
    ui = load_workflow(WORKFLOWS / "ui_v04.json")
    run_workflow(ui, node_classes=fixture_nodes, cache=OutputCache(), progress_stream=io.StringIO())
    save = dict(calls)["TSave"]
    assert save["unique_id"] == "3"
    assert save["extra_pnginfo"] == {"workflow": ui}
    assert save["prompt"]["2"]["inputs"]["seed"] == 1234
    assert save["label"] == "hello:Tensor"


def test_cache_reuses_unchanged_nodes(fixture_nodes, calls):
    cache = OutputCache()
    prompt = _prompt()
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    calls.clear()
    stream = io.StringIO()
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=stream)
    assert calls == []
    assert "(cached)" in stream.getvalue()
    prompt["2"]["inputs"]["seed"] = 43  # TImage upstream is unchanged, TNoise and TSave re-run
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    assert _names(calls) == ["TNoise", "TSave"]
    assert len(cache) == 3  # entries of the previous prompt were dropped


def test_is_changed_nan_always_reruns_node_and_dependents(fixture_nodes, calls):
    prompt = _prompt()
    prompt["5"] = {"class_type": "TVolatile", "inputs": {"image": ["1", 0]}}
    prompt["3"]["inputs"]["images"] = ["5", 0]
    cache = OutputCache()
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    calls.clear()
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    assert _names(calls) == ["TVolatile", "TSave"]


def test_interruption_stops_between_nodes_and_leaves_state_clean(fixture_nodes, calls):
    prompt = _prompt()
    prompt["5"] = {"class_type": "TStop", "inputs": {"image": ["2", 0]}}
    prompt["3"]["inputs"]["images"] = ["5", 0]
    cache = OutputCache()
    with pytest.raises(InterruptedRun):
        execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    assert _names(calls) == ["TImage", "TNoise", "TStop"]  # TSave never started
    host.check_interrupt()  # the flag was cleared: a new run is not interrupted at once
    # completed nodes stay cached; the next run (without the interrupting node) runs only the rest
    calls.clear()
    prompt["5"]["class_type"] = "TVolatile"
    execute(copy.deepcopy(prompt), fixture_nodes, cache=cache, progress_stream=io.StringIO())
    assert _names(calls) == ["TVolatile", "TSave"]


def test_node_failure_names_node_and_class(fixture_nodes):
    prompt = _prompt()
    prompt["5"] = {"class_type": "TFail", "inputs": {"image": ["1", 0]}}
    prompt["3"]["inputs"]["images"] = ["5", 0]
    cache = OutputCache()
    with pytest.raises(NodeExecutionError, match=r"node 5 \(TFail\) failed: ValueError: tensor shapes") as info:
        execute(prompt, fixture_nodes, cache=cache, progress_stream=io.StringIO())
    assert isinstance(info.value.original, ValueError)
    assert len(cache) == 1  # only TImage finished


def test_execution_order_rejects_loops(fixture_nodes):
    prompt = {"1": {"class_type": "TBlend", "inputs": {"a": ["2", 0], "b": ["2", 0], "factor": 0.5}},
              "2": {"class_type": "TBlend", "inputs": {"a": ["1", 0], "b": ["1", 0], "factor": 0.5}},
              "3": {"class_type": "TSave", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(InputFileError, match="loop"):
        execution_order(prompt, fixture_nodes)


def test_run_workflow_ui_v1_with_overrides(fixture_nodes, calls, tmp_path, monkeypatch):
    monkeypatch.setattr(host._Standalone, "output_dir", host._Standalone.output_dir)  # restored afterwards
    results = run_workflow(WORKFLOWS / "ui_v1.json", overrides=["8.filename_prefix=final", "7:1.factor=1.0"],
                           node_classes=fixture_nodes, output_dir=tmp_path, cache=OutputCache(),
                           progress_stream=io.StringIO())
    assert results["8"]["ui"] == {"images": [{"filename": "final_00001.png"}]}
    assert dict(calls)["TBlend"] == {"factor": 1.0}
    assert host.output_dir() != tmp_path, "a run's folders and device apply to that run only"


def test_run_workflow_raises_with_every_error(fixture_nodes):
    prompt = _prompt()
    prompt["1"]["inputs"]["color"] = "cyan"
    prompt["2"]["inputs"]["seed"] = -1
    with pytest.raises(WorkflowInvalid) as info:
        run_workflow(prompt, node_classes=fixture_nodes, cache=OutputCache())
    assert sorted(e["type"] for e in info.value.errors) == ["value_not_in_list", "value_smaller_than_min"]
    assert isinstance(info.value, InputFileError)
