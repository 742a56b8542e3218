"""Committed artefacts that must match the code: the shipped workflows and their API twins, and docs/NODES.md.

Shipped workflows are validated against a models folder (and input folder) holding a stand-in for every file a
workflow picks in a COMBO of installed files (found by `file_choice_inputs`), instead of skipping
`value_not_in_list` errors for such inputs: so the check stays complete (every other list, range and
VALIDATE_INPUTS rule applies, including a loader's own file checks) without the real checkpoints, and no
input is exempted by a naming guess (`sampler_name` is a fixed list, not a file). Validation reads model headers,
so a released model file's stand-in is a header-only copy of it (tests/data/checkpoints), a shipped tiny model is
itself, and any other file is empty.
"""

from pathlib import Path

import pytest

import kineflow
from kineflow.runtime import host
from kineflow.runtime.files import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from kineflow.runtime.node_docs import REGENERATE_COMMAND, file_choice_inputs, node_reference_markdown
from kineflow.runtime.validation import format_error, validate_prompt
from kineflow.runtime.workflow import detect_format, load_workflow, ui_to_api

from checkpoint_fixtures import header_only_safetensors, manifest_shapes

PACK_DIR = Path(kineflow.__file__).resolve().parent
WORKFLOWS = PACK_DIR / "workflows"
API_TWINS = WORKFLOWS / "api"
NODES = kineflow.NODE_CLASS_MAPPINGS
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted(API_TWINS.glob("*.json"))
FILE_EXTENSIONS = set(host.MODEL_EXTENSIONS) | set(VIDEO_EXTENSIONS) | set(IMAGE_EXTENSIONS)


def _core(prompt: dict) -> dict:
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


def test_every_workflow_has_its_twin():
    assert UI_FILES, f"no UI-format workflows in {WORKFLOWS}; the pack ships at least one"
    ui_names = {p.stem for p in UI_FILES}
    api_names = {p.stem for p in API_FILES}
    assert ui_names == api_names, (
        f"workflows without an API twin in workflows/api: {sorted(ui_names - api_names)}; "
        f"API twins without a UI workflow: {sorted(api_names - ui_names)}. "
        "Create the missing side with `kineflow convert FILE --to api|ui -o OUT`.")


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_converts_to_its_twin(ui_file):
    ui = load_workflow(ui_file)
    assert detect_format(ui) == "ui", f"{ui_file.name} should be a UI-format (canvas) workflow"
    twin_file = API_TWINS / ui_file.name
    twin = load_workflow(twin_file)
    assert detect_format(twin) == "api", f"workflows/api/{ui_file.name} should be an API-format prompt"
    prompt, problems = ui_to_api(ui, NODES)
    assert problems == []
    assert _core(prompt) == _core(twin), (
        f"{ui_file.name} and workflows/api/{ui_file.name} differ; regenerate the twin with "
        f"`kineflow convert workflows/{ui_file.name} --to api -o workflows/api/{ui_file.name}`")


# The released files the shipped workflows name -> (manifest, key prefix in the file) of the tensors they hold.
RELEASED_FILES = {
    "hunyuan_video_t2v_720p_bf16.safetensors": [("hunyuan_video_dit_comfy", "")],
    "hunyuan_video_vae_bf16.safetensors": [("hunyuan_video_vae_comfy", "")],
    "llava_llama3_fp16.safetensors": [("llava_llama3_8b_text_hf", "")],
    "clip_l.safetensors": [("clip_l_text_hf", "")],
    "v1-5-pruned-emaonly.safetensors": [("sd15_unet_ldm", ""), ("sd_vae_ldm", ""),
                                        ("clip_l_text_hf", "cond_stage_model.transformer.")],
}


def _placeholder(folder: Path, name: str) -> None:
    """A stand-in for a file a workflow names (see the module's docstring), or for an extension-less name a Hugging
    Face style folder (config.json). A shipped tiny model is found among the shipped weights: nothing to write."""
    path = folder / name
    if any((host.SHIPPED_WEIGHTS_DIR / kind / name).exists() for kind in host.MODEL_FOLDERS):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if name in RELEASED_FILES:
        shapes = {prefix + key: shape for manifest, prefix in RELEASED_FILES[name]
                  for key, shape in manifest_shapes(manifest).items()}
        header_only_safetensors(shapes, path)
    elif path.suffix.lower() in FILE_EXTENSIONS:
        path.touch()
    else:
        path.mkdir(exist_ok=True)
        (path / "config.json").write_text("{}")


@pytest.mark.parametrize("api_file", API_FILES, ids=lambda p: p.stem)
def test_workflow_validates(api_file, tmp_path, monkeypatch):
    prompt = load_workflow(api_file)
    models, inputs = tmp_path / "models", tmp_path / "input"
    for node in prompt.values():
        cls = NODES.get(node["class_type"])
        for name in file_choice_inputs(cls) if cls is not None else ():
            value = node["inputs"].get(name)
            if isinstance(value, str) and value:
                for folders in host.MODEL_FOLDERS.values():
                    for folder in folders:
                        _placeholder(models / folder, value)
                _placeholder(inputs, value)
        tokenizer = node["inputs"].get("llm_tokenizer") if node["class_type"] == "KineFlowLoadTextEncoders" else None
        if isinstance(tokenizer, str) and tokenizer and not Path(tokenizer).is_absolute():
            (models / "text_encoders" / tokenizer).mkdir(parents=True, exist_ok=True)  # validation looks for its file
            (models / "text_encoders" / tokenizer / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(host._Standalone, "models_dir", models)
    monkeypatch.setattr(host._Standalone, "input_dir", inputs)
    errors = validate_prompt(prompt, NODES)
    assert errors == [], f"{api_file.name} is invalid:\n" + "\n".join(format_error(e) for e in errors)


def test_node_reference_is_current():
    committed = PACK_DIR / "docs" / "NODES.md"
    fresh = node_reference_markdown(NODES, kineflow.NODE_DISPLAY_NAME_MAPPINGS)
    assert committed.is_file(), f"docs/NODES.md is missing; create it with `{REGENERATE_COMMAND}`"
    assert committed.read_text(encoding="utf-8") == fresh, (
        f"docs/NODES.md is out of date with the registered nodes; regenerate it with `{REGENERATE_COMMAND}`")


def test_ui_workflow_and_api_twin_produce_bit_identical_frames(tmp_path):
    """`kineflow run` on the canvas file and on its API twin renders the same frames, bit for bit."""
    import torch

    from kineflow.runtime.executor import OutputCache, run_workflow

    ui = run_workflow(str(WORKFLOWS / "shapes_video.json"), output_dir=tmp_path / "ui", cache=OutputCache())
    api = run_workflow(str(WORKFLOWS / "api" / "shapes_video.json"), output_dir=tmp_path / "api", cache=OutputCache())
    frames_ui, frames_api = ui["2"]["outputs"][0], api["2"]["outputs"][0]
    assert frames_ui.shape == (33, 256, 256, 3)
    assert torch.equal(frames_ui, frames_api)
    saved_ui = (tmp_path / "ui" / "KineFlow" / "shapes_00001_.mp4").read_bytes()
    saved_api = (tmp_path / "api" / "KineFlow" / "shapes_00001_.mp4").read_bytes()
    assert len(saved_ui) > 1000 and len(saved_api) > 1000
