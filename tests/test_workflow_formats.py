"""Workflow loading, format detection, UI -> API conversion (frontend rules) and --set overrides."""

import copy
import json

import pytest

from kineflow.errors import InputFileError
from kineflow.runtime.workflow import (
    apply_overrides,
    detect_format,
    load_workflow,
    parse_override,
    ui_to_api,
    widget_slots,
)

from conftest import DATA_DIR

WORKFLOWS = DATA_DIR / "workflows"


def _inputs(prompt):
    return {node_id: node["inputs"] for node_id, node in prompt.items()}


def test_detect_format():
    assert detect_format(load_workflow(WORKFLOWS / "basic_api.json")) == "api"
    assert detect_format(load_workflow(WORKFLOWS / "ui_v04.json")) == "ui"
    assert detect_format(load_workflow(WORKFLOWS / "ui_v1.json")) == "ui"
    with pytest.raises(InputFileError, match="empty object"):
        detect_format({})


def test_litegraph_04_reroute_primitive_note_seed_control(fixture_nodes):
    prompt, problems = ui_to_api(load_workflow(WORKFLOWS / "ui_v04.json"), fixture_nodes)
    assert problems == []
    assert _inputs(prompt) == {
        "1": {"width": 8, "height": 6, "color": "green"},
        # seed comes from the PrimitiveNode (1234), not the widget (7); "randomize"/"fixed" controls are skipped
        "2": {"seed": 1234, "strength": 0.25, "steps": 3, "image": ["1", 0]},
        # the Reroute is resolved to its source; the forceInput `label` has no widget slot
        "3": {"filename_prefix": "clip", "images": ["2", 0], "label": ["7", 0]},
        "7": {"text": "hello", "any": ["1", 0]},
    }
    assert prompt["1"]["_meta"]["title"] == "Source"
    assert prompt["2"]["class_type"] == "TNoise"


def test_version_1_bypass_mute_subgraph_dict_widgets(fixture_nodes):
    prompt, problems = ui_to_api(load_workflow(WORKFLOWS / "ui_v1.json"), fixture_nodes)
    assert problems == []
    assert _inputs(prompt) == {
        "1": {"width": 4, "height": 4, "color": "blue"},  # dict-shaped widgets_values
        # mask came from a muted node: dropped; seed is a linked widget: the link wins over the stored 5
        "5": {"seed": ["6", 1], "strength": 0.1, "steps": 1, "image": ["7:1", 0]},
        "6": {"seed": 9, "strength": 0.0, "steps": 1, "image": ["1", 0]},
        # subgraph flattened: the bypassed node 3 passes node 1 through; factor is the promoted widget value
        "7:1": {"factor": 0.75, "a": ["1", 0], "b": ["7:2", 0]},
        "7:2": {"width": 4, "height": 4, "color": "red"},
        "8": {"filename_prefix": "v1", "images": ["5", 0]},
    }


def test_subgraph_input_without_promoted_value_keeps_inner_widget(fixture_nodes):
    ui = load_workflow(WORKFLOWS / "ui_v1.json")
    subgraph_node = next(n for n in ui["nodes"] if n["id"] == 7)
    del subgraph_node["widgets_values"]
    prompt, _ = ui_to_api(ui, fixture_nodes)
    assert prompt["7:1"]["inputs"]["factor"] == 0.5


def _chain(mode_middle, middle_inputs, middle_outputs):
    """TImage(1) -> middle(2) -> TSave(3), links in litegraph 0.4 form."""
    return {
        "version": 0.4,
        "nodes": [
            {"id": 1, "type": "TImage", "mode": 0, "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
             "widgets_values": [4, 4, "red"]},
            {"id": 2, "type": "TNoise", "mode": mode_middle, "inputs": middle_inputs, "outputs": middle_outputs,
             "widgets_values": [1, "fixed", 0.5, 1, "fixed"]},
            {"id": 3, "type": "TSave", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 2}],
             "widgets_values": ["x"]},
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"]],
    }


def test_bypass_picks_first_input_of_matching_type(fixture_nodes):
    # the output slot 0 is IMAGE; input slot 0 is a STRING-typed socket, so the IMAGE input at slot 1 is used
    ui = _chain(4, [{"name": "mask", "type": "STRING", "link": None}, {"name": "image", "type": "IMAGE", "link": 1}],
                [{"name": "IMAGE", "type": "IMAGE", "links": [2]}])
    ui["links"][0] = [1, 1, 0, 2, 1, "IMAGE"]
    prompt, problems = ui_to_api(ui, fixture_nodes)
    assert problems == []
    assert set(prompt) == {"1", "3"}
    assert prompt["3"]["inputs"]["images"] == ["1", 0]


def test_bypass_without_matching_input_leaves_input_unset(fixture_nodes):
    ui = _chain(4, [{"name": "image", "type": "LATENT", "link": 1}], [{"name": "IMAGE", "type": "IMAGE", "links": [2]}])
    prompt, _ = ui_to_api(ui, fixture_nodes)
    assert "images" not in prompt["3"]["inputs"]


def test_muted_node_removes_dependent_links(fixture_nodes):
    ui = _chain(2, [{"name": "image", "type": "IMAGE", "link": 1}], [{"name": "IMAGE", "type": "IMAGE", "links": [2]}])
    prompt, _ = ui_to_api(ui, fixture_nodes)
    assert "2" not in prompt and "images" not in prompt["3"]["inputs"]


def test_legacy_force_input_widget_values_are_dropped(fixture_nodes):
    # before frontend 1.16 a forceInput input (TSave.label) also had a widgets_values slot
    ui = {"version": 0.4, "links": [], "nodes": [
        {"id": 3, "type": "TSave", "mode": 0, "inputs": [], "widgets_values": ["clip", ""]}]}
    prompt, _ = ui_to_api(ui, fixture_nodes)
    assert prompt["3"]["inputs"] == {"filename_prefix": "clip"}


def test_list_widget_values_are_wrapped_and_missing_ones_defaulted(fixture_nodes):
    ui = {"version": 0.4, "links": [], "nodes": [
        {"id": 1, "type": "TLabel", "mode": 0, "widgets_values": [["a", "b"]]},
        {"id": 2, "type": "TImage", "mode": 0, "widgets_values": [16]}]}
    prompt, _ = ui_to_api(ui, fixture_nodes)
    assert prompt["1"]["inputs"]["text"] == {"__value__": ["a", "b"]}
    assert prompt["2"]["inputs"] == {"width": 16, "height": 4, "color": "red"}


def test_unknown_ui_node_is_kept_for_validation(fixture_nodes):
    ui = {"version": 0.4, "links": [], "nodes": [{"id": 4, "type": "NotInstalled", "mode": 0, "widgets_values": [1]}]}
    prompt, problems = ui_to_api(ui, fixture_nodes)
    assert prompt == {"4": {"inputs": {}, "class_type": "NotInstalled", "_meta": {"title": "NotInstalled"}}}
    assert problems == []


def test_broken_links_are_reported_not_raised(fixture_nodes):
    ui = _chain(0, [{"name": "image", "type": "IMAGE", "link": 99}], [{"name": "IMAGE", "type": "IMAGE", "links": [2]}])
    prompt, problems = ui_to_api(ui, fixture_nodes)
    assert [p["type"] for p in problems] == ["bad_linked_input"]
    assert problems[0]["node_id"] == "2" and "link 99" in problems[0]["details"]
    assert "image" not in prompt["2"]["inputs"]


def test_load_workflow_errors(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_workflow(tmp_path / "missing.json")
    with pytest.raises(InputFileError, match="is not a file"):
        load_workflow(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {"class_type": "TImage",\n  }\n}')
    with pytest.raises(InputFileError, match=r"line 3 column 3"):
        load_workflow(bad)


def test_load_workflow_accepts_utf8_bom(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"1": {"class_type": "TImage", "inputs": {}}}).encode())
    assert load_workflow(path)["1"]["class_type"] == "TImage"


def test_parse_override_values():
    assert parse_override("3.seed=42") == ("3", "seed", 42)
    assert parse_override("3.text=hello world") == ("3", "text", "hello world")
    assert parse_override("7:1.factor=0.25") == ("7:1", "factor", 0.25)
    assert parse_override('2.text="42"') == ("2", "text", "42")
    with pytest.raises(InputFileError, match="NODE_ID.input=value"):
        parse_override("seed=42")


def test_apply_overrides(fixture_nodes):
    prompt = load_workflow(WORKFLOWS / "basic_api.json")
    original = copy.deepcopy(prompt)
    result = apply_overrides(prompt, ["2.seed=7", "2.mask=[\"1\", 0]", "3.filename_prefix=run"], fixture_nodes)
    assert prompt == original
    assert result["2"]["inputs"]["seed"] == 7
    assert result["2"]["inputs"]["mask"] == {"__value__": ["1", 0]}
    assert result["3"]["inputs"]["filename_prefix"] == "run"
    with pytest.raises(InputFileError, match="no node '99'"):
        apply_overrides(prompt, ["99.seed=1"], fixture_nodes)
    with pytest.raises(InputFileError, match="has no input 'sead'.*seed"):
        apply_overrides(prompt, ["2.sead=1"], fixture_nodes)


class _ControlKinds:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "seed": ("INT", {"control_after_generate": False}),  # explicit flag wins over the name
            "noise_seed": ("INT", {}),
            "count": ("INT", {"control_after_generate": True}),
            "sampler": (["euler", "ddim"], {"control_after_generate": True}),  # control + filter list
            "scale": ("FLOAT", {"default": 1.5}),
            "steps": ("INT", {"forceInput": True}),
        }, "optional": {"prompt": ("COMBO", {"options": ["a", "b"]})}}


def test_widget_slots_follow_frontend_rules():
    assert [(name, extra) for name, extra, _, _ in widget_slots(_ControlKinds)] == [
        ("seed", 0), ("noise_seed", 1), ("count", 1), ("sampler", 2), ("scale", 0), ("prompt", 0)]
    ui = {"version": 0.4, "links": [], "nodes": [{"id": 1, "type": "_ControlKinds", "mode": 0,
          "widgets_values": [1, 2, "fixed", 3, "randomize", "ddim", "increment", "", 2.5, "b"]}]}
    prompt, _ = ui_to_api(ui, {"_ControlKinds": _ControlKinds})
    assert prompt["1"]["inputs"] == {"seed": 1, "noise_seed": 2, "count": 3, "sampler": "ddim", "scale": 2.5, "prompt": "b"}
