"""API -> UI conversion (`api_to_ui`): round trips through `ui_to_api`, the saved canvas format, `kineflow convert`."""

import json

import pytest

import kineflow
from kineflow.runtime.cli import main
from kineflow.errors import InputFileError
from kineflow.runtime.workflow import ui_to_api
from kineflow.runtime.workflow_export import COLUMN_SPACING, api_to_ui, unknown_node_types

from conftest import FIXTURE_NODES

PACK = kineflow.NODE_CLASS_MAPPINGS
NAMES = kineflow.NODE_DISPLAY_NAME_MAPPINGS

# Fixture nodes: seed widget (control value by name), optional socket (mask), optional INT with
# control_after_generate (steps), linked widget input (seed <- TNoise's INT output), forceInput socket (label),
# a node with two outputs used from both slots, a custom title.
FIXTURE_PROMPT = {
    "1": {"class_type": "TImage", "inputs": {"width": 8, "height": 6, "color": "green"}, "_meta": {"title": "Source"}},
    "4": {"class_type": "TNoise", "inputs": {"image": ["1", 0], "seed": 77, "strength": 0.5, "steps": 2}},
    "2": {"class_type": "TNoise", "inputs": {"image": ["4", 0], "seed": ["4", 1], "strength": 0.25, "steps": 3,
                                              "mask": ["1", 0]}},
    "7": {"class_type": "TLabel", "inputs": {"text": "hi", "any": ["4", 0]}},
    "12": {"class_type": "TSave", "inputs": {"images": ["2", 0], "filename_prefix": "x", "label": ["7", 0]}},
}

# The pack's real nodes: a text-to-video chain, and a frames chain where Frame Info's second and third INT
# outputs drive widget inputs of Resize Frames, and an optional socket (context_options) is linked.
PACK_T2V = {
    "1": {"class_type": "KineFlowLoadVideoModel", "inputs": {"model_name": "tiny_dit.safetensors", "weight_dtype": "auto", "fp8": "disabled"}},
    "2": {"class_type": "KineFlowLoadVideoVAE", "inputs": {"vae_name": "tiny_vae.safetensors", "dtype": "auto"}},
    "3": {"class_type": "KineFlowLoadTextEncoders", "inputs": {"llm_name": "tiny_llm", "clip_name": "tiny_clip.safetensors",
                                                              "dtype": "auto", "llm_tokenizer": "", "crop_start": -1}},
    "4": {"class_type": "KineFlowTextEncode", "inputs": {"text_encoder": ["3", 0], "prompt": "a red circle | moves\nleft",
                                                        "negative_prompt": ""}, "_meta": {"title": "Positive"}},
    "5": {"class_type": "KineFlowEmptyVideoLatent", "inputs": {"width": 64, "height": 48, "frames": 9, "batch_size": 1,
                                                              "latent_format": "hunyuan_video"}},
    "9": {"class_type": "KineFlowContextOptions", "inputs": {}},
    "6": {"class_type": "KineFlowSampler", "inputs": {"model": ["1", 0], "conditioning": ["4", 0], "latent": ["5", 0],
                                                     "seed": 123456789, "context_options": ["9", 0]}},
    "7": {"class_type": "KineFlowVAEDecode", "inputs": {"vae": ["2", 0], "latent": ["6", 0]}},
    "8": {"class_type": "KineFlowSaveVideo", "inputs": {"images": ["7", 0]}},
}
PACK_FRAMES = {
    "1": {"class_type": "KineFlowShapesVideo", "inputs": {"seed": 5, "frames": 9}},
    "2": {"class_type": "KineFlowFrameInfo", "inputs": {"images": ["1", 0]}},
    "3": {"class_type": "KineFlowResizeFrames", "inputs": {"images": ["1", 0], "width": ["2", 2], "height": ["2", 1]}},
    "4": {"class_type": "KineFlowEveryNthFrame", "inputs": {"images": ["3", 0], "n": 2}},
    "5": {"class_type": "KineFlowSaveVideo", "inputs": {"images": ["4", 0], "filename_prefix": "frames"}},
}


def _complete(prompt: dict, classes: dict) -> dict:
    """Fill the widget inputs a prompt leaves out with their defaults, as the frontend always sends them all."""
    from kineflow.runtime.workflow import widget_slots

    result = json.loads(json.dumps(prompt))
    for node in result.values():
        for name, _, default, _ in widget_slots(classes[node["class_type"]]):
            node["inputs"].setdefault(name, default)
    return result


def _core(prompt: dict) -> dict:
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}


@pytest.mark.parametrize("prompt, classes", [(FIXTURE_PROMPT, FIXTURE_NODES), (PACK_T2V, PACK), (PACK_FRAMES, PACK)],
                         ids=["fixture", "pack_t2v", "pack_frames"])
def test_round_trip_is_identity(prompt, classes):
    prompt = _complete(prompt, classes)
    ui = api_to_ui(prompt, classes, display_names=NAMES)
    back, problems = ui_to_api(json.loads(json.dumps(ui)), classes)
    assert problems == []
    assert _core(back) == _core(prompt)
    for node_id, node in prompt.items():
        if "_meta" in node:  # custom titles survive
            assert back[node_id]["_meta"]["title"] == node["_meta"]["title"]


def test_saved_format_matches_the_frontend():
    prompt = _complete(FIXTURE_PROMPT, FIXTURE_NODES)
    ui = api_to_ui(prompt, FIXTURE_NODES)
    assert ui["version"] == 0.4 and ui["groups"] == [] and ui["config"] == {}
    assert ui["extra"]["ds"] == {"scale": 1.0, "offset": [0, 0]}
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert sorted(nodes) == [1, 2, 4, 7, 12] and ui["last_node_id"] == 12 and ui["last_link_id"] == len(ui["links"])

    noise = nodes[2]
    # sockets first (declaration order, optional ones hollow), then the linked widget input
    assert noise["inputs"] == [
        {"name": "image", "type": "IMAGE", "link": noise["inputs"][0]["link"]},
        {"name": "mask", "type": "IMAGE", "shape": 7, "link": noise["inputs"][1]["link"]},
        {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": noise["inputs"][2]["link"]},
    ]
    # seed (linked: keeps its default) + control, strength, steps + control
    assert noise["widgets_values"] == [0, "fixed", 0.25, 3, "fixed"]
    assert nodes[4]["widgets_values"] == [77, "fixed", 0.5, 2, "fixed"]
    assert nodes[12]["inputs"][1] == {"name": "label", "type": "STRING", "shape": 7, "link": nodes[12]["inputs"][1]["link"]}
    assert nodes[12]["widgets_values"] == ["x"]
    assert nodes[1]["title"] == "Source" and "title" not in nodes[2]
    assert all(node["properties"] == {"Node name for S&R": node["type"]} and node["mode"] == 0 for node in ui["nodes"])
    assert [o["name"] for o in nodes[4]["outputs"]] == ["IMAGE", "INT"]
    assert [o["slot_index"] for o in nodes[4]["outputs"]] == [0, 1]

    # every link is recorded at both ends with the source output's type
    for link_id, origin, origin_slot, target, target_slot, link_type in ui["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == link_type
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    linked = [i["link"] for n in ui["nodes"] for i in n["inputs"] if i["link"] is not None]
    assert sorted(linked) == [link[0] for link in ui["links"]]
    assert nodes[2]["outputs"][1]["links"] is None  # an unused output


def test_layout_and_order_follow_dependencies():
    ui = api_to_ui(_complete(PACK_T2V, PACK), PACK)
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert sorted(node["order"] for node in ui["nodes"]) == list(range(len(nodes)))
    for _, origin, _, target, _, _ in ui["links"]:
        assert nodes[origin]["order"] < nodes[target]["order"]
        assert nodes[target]["pos"][0] - nodes[origin]["pos"][0] >= COLUMN_SPACING
    # loaders have no inputs: first column, stacked without overlapping
    first_column = sorted((n for n in ui["nodes"] if n["pos"][0] == 50), key=lambda n: n["pos"][1])
    assert {n["id"] for n in first_column} == {1, 2, 3, 5, 9}
    for upper, lower in zip(first_column, first_column[1:]):
        assert lower["pos"][1] > upper["pos"][1] + upper["size"][1]
    # the sampler's node is deeper than its three inputs' column
    assert nodes[6]["pos"][0] == 50 + 2 * COLUMN_SPACING and nodes[8]["pos"][0] == 50 + 4 * COLUMN_SPACING


def test_non_integer_ids_are_renumbered():
    prompt = {"5:1": {"class_type": "TImage", "inputs": {"width": 4, "height": 4, "color": "red"}},
              "3": {"class_type": "TSave", "inputs": {"images": ["5:1", 0], "filename_prefix": "p"}},
              "07": {"class_type": "TSave", "inputs": {"images": ["5:1", 0], "filename_prefix": "q"}}}
    ui = api_to_ui(prompt, FIXTURE_NODES)
    assert sorted(node["id"] for node in ui["nodes"]) == [3, 4, 5]
    back, problems = ui_to_api(ui, FIXTURE_NODES)
    assert problems == []
    assert back["3"]["inputs"] == {"filename_prefix": "p", "images": ["4", 0]}
    assert back["5"]["inputs"] == {"filename_prefix": "q", "images": ["4", 0]}


def test_unknown_node_types_are_kept_on_a_best_guess():
    prompt = {"1": {"class_type": "TImage", "inputs": {"width": 4, "height": 4, "color": "red"}},
              "2": {"class_type": "SomeoneElsesNode", "inputs": {"strength": 0.3, "image": ["1", 0], "mode": "a"}},
              "3": {"class_type": "TSave", "inputs": {"images": ["2", 1], "filename_prefix": "p"}}}
    assert unknown_node_types(prompt, FIXTURE_NODES) == ["SomeoneElsesNode"]
    ui = api_to_ui(prompt, FIXTURE_NODES)
    other = next(node for node in ui["nodes"] if node["id"] == 2)
    assert other["widgets_values"] == [0.3, "a"]
    assert other["inputs"] == [{"name": "image", "type": "IMAGE", "link": 1}]
    assert [o["type"] for o in other["outputs"]] == ["*", "*"] and other["outputs"][1]["links"] == [2]


@pytest.mark.parametrize("prompt, message", [
    ({"1": {"class_type": "TSave", "inputs": {"images": ["9", 0], "filename_prefix": "p"}}}, "not in the prompt"),
    ({"1": {"class_type": "TSave", "inputs": {"images": "a.png", "filename_prefix": "p"}}}, "socket"),
    ({"1": {"class_type": "TSave", "inputs": {"images": [1, 0, 0], "filename_prefix": "p"}}}, "a link is"),
    ({"1": {"class_type": "TImage", "inputs": {"width": 4, "colour": "red"}}}, "does not declare"),
    ({"1": {"class_type": "TImage", "inputs": {}}, "2": {"class_type": "TSave", "inputs": {"images": ["1", 3]}}},
     "has 1 output"),
    ({"1": {"inputs": {}}}, "class_type"),
    ({"nodes": [], "links": []}, "got a UI workflow"),
])
def test_prompts_that_cannot_be_drawn(prompt, message):
    with pytest.raises(InputFileError, match=message):
        api_to_ui(prompt, FIXTURE_NODES)


def test_convert_command(tmp_path, capsys):
    api_file = tmp_path / "prompt.json"
    api_file.write_text(json.dumps(_complete(FIXTURE_PROMPT, FIXTURE_NODES)))
    ui_file = tmp_path / "out" / "canvas.json"
    assert main(["convert", str(api_file), "--to", "ui", "-o", str(ui_file)], node_classes=FIXTURE_NODES) == 0
    assert sorted(p.name for p in ui_file.parent.iterdir()) == ["canvas.json"]  # no temporary file left behind
    assert json.loads(ui_file.read_text())["version"] == 0.4

    assert main(["convert", str(ui_file), "--to", "api"], node_classes=FIXTURE_NODES) == 0
    out = capsys.readouterr().out
    assert _core(json.loads(out)) == _core(_complete(FIXTURE_PROMPT, FIXTURE_NODES))

    assert main(["convert", str(ui_file), "--to", "ui"], node_classes=FIXTURE_NODES) == 2
    assert "already in UI format" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.json"), "--to", "api"], node_classes=FIXTURE_NODES) == 2
    assert "does not exist" in capsys.readouterr().err

    broken = json.loads(ui_file.read_text())
    broken["nodes"][1]["inputs"][0]["link"] = 999  # a link id that is not in `links`
    broken_file = tmp_path / "broken.json"
    broken_file.write_text(json.dumps(broken))
    out_file = tmp_path / "never.json"
    assert main(["convert", str(broken_file), "--to", "api", "-o", str(out_file)], node_classes=FIXTURE_NODES) == 2
    assert "link that does not exist" in capsys.readouterr().err and not out_file.exists()
