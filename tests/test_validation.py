"""validate_prompt: ComfyUI's rules and error shape, every problem reported at once."""

import copy

import pytest

from kineflow.runtime.validation import format_error, types_match, validate_prompt
from kineflow.runtime.workflow import load_workflow

from conftest import DATA_DIR


def _prompt():
    return copy.deepcopy(load_workflow(DATA_DIR / "workflows" / "basic_api.json"))


def _types(errors):
    return sorted(e["type"] for e in errors)


def test_valid_prompt_and_unreachable_nodes_are_not_checked(fixture_nodes):
    # node 4 has width 9999 (> max 64) but no output node depends on it, so ComfyUI ignores it
    assert validate_prompt(_prompt(), fixture_nodes) == []


def test_error_shape_matches_comfyui(fixture_nodes):
    prompt = _prompt()
    prompt["2"]["inputs"]["seed"] = -3
    [error] = validate_prompt(prompt, fixture_nodes)
    assert error["type"] == "value_smaller_than_min"
    assert error["message"] == "Value -3 smaller than min of 0"
    assert error["details"] == "seed"
    assert error["extra_info"] == {"input_name": "seed", "received_value": -3}
    assert (error["node_id"], error["class_type"]) == ("2", "TNoise")
    assert format_error(error) == "node 2 (TNoise) input 'seed': Value -3 smaller than min of 0: seed [value_smaller_than_min]"


def test_every_problem_is_reported(fixture_nodes):
    prompt = _prompt()
    prompt["1"]["inputs"].update(width=0, color="cyan")
    prompt["2"]["inputs"].update(seed="x", strength=3)
    del prompt["3"]["inputs"]["filename_prefix"]
    prompt["5"] = {"class_type": "Missing", "inputs": {}}
    assert _types(validate_prompt(prompt, fixture_nodes)) == sorted([
        "value_smaller_than_min", "value_not_in_list", "invalid_input_type", "value_bigger_than_max",
        "required_input_missing", "missing_node_type"])


def test_values_are_coerced_like_comfyui(fixture_nodes):
    prompt = _prompt()
    prompt["1"]["inputs"].update(width="12", height=7.9)
    prompt["2"]["inputs"].update(strength="0.5")
    prompt["3"]["inputs"]["filename_prefix"] = 5
    assert validate_prompt(prompt, fixture_nodes) == []
    assert prompt["1"]["inputs"]["width"] == 12 and prompt["1"]["inputs"]["height"] == 7
    assert prompt["2"]["inputs"]["strength"] == 0.5
    assert prompt["3"]["inputs"]["filename_prefix"] == "5"


def test_wrapped_list_value_is_unwrapped(fixture_nodes):
    prompt = _prompt()
    prompt["3"]["inputs"]["filename_prefix"] = {"__value__": ["a"]}
    assert validate_prompt(prompt, fixture_nodes) == []
    assert prompt["3"]["inputs"]["filename_prefix"] == "['a']"


def test_wildcard_and_union_types():
    assert types_match("IMAGE", "*") and types_match("*", "LATENT")
    assert types_match("IMAGE,MASK", "MASK") and not types_match("IMAGE", "LATENT")


def test_wildcard_input_accepts_any_link_and_custom_validation_runs(fixture_nodes):
    prompt = _prompt()
    prompt["6"] = {"class_type": "TLabel", "inputs": {"text": "ok", "any": ["2", 1]}}
    prompt["3"]["inputs"]["label"] = ["6", 0]
    assert validate_prompt(prompt, fixture_nodes) == []
    prompt["6"]["inputs"]["text"] = ""
    [error] = validate_prompt(prompt, fixture_nodes)
    assert error["type"] == "custom_validation_failed" and "must be non-empty" in error["details"]


def test_type_mismatch_and_bad_links(fixture_nodes):
    prompt = _prompt()
    prompt["3"]["inputs"]["images"] = ["2", 1]  # TNoise output 1 is INT
    [error] = validate_prompt(prompt, fixture_nodes)
    assert error["type"] == "return_type_mismatch" and error["extra_info"]["received_type"] == "INT"
    prompt["3"]["inputs"]["images"] = ["2", 5]
    assert _types(validate_prompt(prompt, fixture_nodes)) == ["bad_linked_input"]
    prompt["3"]["inputs"]["images"] = ["42", 0]
    assert _types(validate_prompt(prompt, fixture_nodes)) == ["bad_linked_input"]


@pytest.mark.parametrize("value", ["abc", None, 5, {"__value__": ["1", 0]}, {"a": 1}])
def test_a_constant_where_a_link_belongs_names_the_input_and_the_type(fixture_nodes, value):
    """ComfyUI would hand the constant to the node, which then fails at run time; here validation stops it."""
    prompt = _prompt()
    prompt["2"]["inputs"]["image"] = value
    [error] = validate_prompt(prompt, fixture_nodes)
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "image"
    assert format_error(error).startswith("node 2 (TNoise) input 'image': Input needs a link from a node's IMAGE output")


def test_a_wildcard_input_may_hold_a_constant(fixture_nodes):
    prompt = _prompt()
    prompt["6"] = {"class_type": "TLabel", "inputs": {"text": "ok", "any": 3}}
    prompt["3"]["inputs"]["label"] = ["6", 0]
    assert validate_prompt(prompt, fixture_nodes) == []


def test_cycle_is_reported_once(fixture_nodes):
    prompt = {
        "1": {"class_type": "TImage", "inputs": {"width": 4, "height": 4, "color": "red"}},
        "2": {"class_type": "TBlend", "inputs": {"a": ["1", 0], "b": ["3", 0], "factor": 0.5}},
        "3": {"class_type": "TBlend", "inputs": {"a": ["2", 0], "b": ["1", 0], "factor": 0.5}},
        "4": {"class_type": "TSave", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    [error] = validate_prompt(prompt, fixture_nodes)
    assert error["type"] == "dependency_cycle" and error["extra_info"]["nodes"] == ["2", "3"]


def test_no_outputs_not_claimed_when_a_node_type_is_unknown(fixture_nodes):
    prompt = {"1": {"class_type": "TImage", "inputs": {}}}
    assert _types(validate_prompt(prompt, fixture_nodes)) == ["prompt_no_outputs"]
    prompt["2"] = {"class_type": "SomeoneElsesSave", "inputs": {}}
    assert _types(validate_prompt(prompt, fixture_nodes)) == ["missing_node_type"]


def test_not_a_prompt(fixture_nodes):
    assert _types(validate_prompt([], fixture_nodes)) == ["invalid_prompt"]
    assert _types(validate_prompt({"1": {"inputs": {}}}, fixture_nodes)) == ["invalid_prompt"]
