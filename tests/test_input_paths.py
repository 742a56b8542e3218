"""Load Video / Load Image read only inside the input folder: `..`, symlinks leading out and absolute paths in a
workflow are refused at validation (exit 2). Standalone, a path the user types with `--set` is read wherever it
points; inside ComfyUI (simulated as tests/test_host.py does) ComfyUI's annotated names choose the folder."""

import json
import os
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from kineflow.errors import InputFileError
from kineflow.nodes.video_io import KineFlowLoadImage, KineFlowLoadVideo
from kineflow.runtime import cli, host


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """An input folder holding dot.png and clips/dot.png, and secret.png outside it; standalone settings restored."""
    for name in ("input_dir", "output_dir", "user_paths"):
        monkeypatch.setattr(host._Standalone, name, getattr(host._Standalone, name))
    inp, out = tmp_path / "input", tmp_path / "output"
    (inp / "clips").mkdir(parents=True)
    for path in (inp / "dot.png", inp / "clips" / "dot.png", tmp_path / "secret.png"):
        Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    host.configure(input_dir=inp, output_dir=out)
    return tmp_path


def _workflow(tmp_path: Path, image_path: str) -> Path:
    path = tmp_path / "load_image.json"
    path.write_text(json.dumps({
        "1": {"class_type": "KineFlowLoadImage", "inputs": {"image": "dot.png", "image_path": image_path}},
        "2": {"class_type": "KineFlowSaveVideo", "inputs": {
            "images": ["1", 0], "frame_rate": 8.0, "filename_prefix": "loaded", "format": "mp4", "quality": 80,
            "loop_count": 0, "save_metadata": False}},
    }))
    return path


def test_files_inside_the_input_folder_load(folders):
    inp = folders / "input"
    for name in ("dot.png", "clips/dot.png", "dot.png [input]", "clips/../dot.png", str(inp / "dot.png")):
        assert KineFlowLoadImage.VALIDATE_INPUTS(image="dot.png", image_path=name) is True, name
    (inp / "alias.png").symlink_to(inp / "clips" / "dot.png")  # a symlink that stays inside
    assert KineFlowLoadImage.VALIDATE_INPUTS(image="alias.png") is True
    image, _ = KineFlowLoadImage().load(image="alias.png")
    assert image.shape == (1, 4, 4, 3)


@pytest.mark.parametrize("trick", ["../secret.png", "clips/../../secret.png", "ABSOLUTE", "~/secret.png", "LINK"])
def test_path_tricks_in_a_workflow_are_refused_at_validation(trick, folders, capsys):
    inp = folders / "input"
    (inp / "link.png").symlink_to(folders / "secret.png")
    value = {"ABSOLUTE": str(folders / "secret.png"), "LINK": "link.png"}.get(trick, trick)
    message = KineFlowLoadImage.VALIDATE_INPUTS(image="dot.png", image_path=value)
    assert isinstance(message, str) and "a workflow may only read files inside that folder" in message, message
    with pytest.raises(InputFileError, match="outside"):
        KineFlowLoadImage().load(image="dot.png", image_path=value)
    assert cli.main(["validate", str(_workflow(folders, value)), "--input-dir", str(inp)]) == 2
    err = capsys.readouterr().err
    assert "outside" in err and "--set NODE.input=PATH" in err and "Traceback" not in err


def test_video_paths_follow_the_same_rule(folders):
    message = KineFlowLoadVideo.VALIDATE_INPUTS(video="x.mp4", video_path="../secret.mp4")
    assert "a workflow may only read files inside that folder" in message
    assert KineFlowLoadVideo.IS_CHANGED(video="x.mp4", video_path="../secret.mp4").startswith("refused:")


def test_a_path_typed_with_set_is_the_users_and_is_read_anywhere(folders, capsys):
    secret = str(folders / "secret.png")
    workflow = _workflow(folders, "")
    args = ["--input-dir", str(folders / "input"), "--set", f"1.image_path={secret}"]
    assert cli.main(["validate", str(workflow), *args]) == 0
    assert cli.main(["run", str(workflow), *args, "--output-dir", str(folders / "output")]) == 0
    assert (folders / "output" / "loaded_00001_.mp4").is_file()
    # the same path written into the workflow file is not the user's
    assert cli.main(["validate", str(_workflow(folders, secret)), "--input-dir", str(folders / "input")]) == 2
    assert "outside" in capsys.readouterr().err


# --------------------------------------------------------------------------- inside ComfyUI
@pytest.fixture
def comfyui(folders, monkeypatch):
    """ComfyUI's folder_paths as far as the loaders use it: input/output/temp folders and annotated names."""
    fp = types.ModuleType("folder_paths")
    dirs = {"input": folders / "input", "output": folders / "comfy_output", "temp": folders / "comfy_temp"}
    for folder in dirs.values():
        folder.mkdir(exist_ok=True)
    fp.get_input_directory = lambda: str(dirs["input"])

    def annotated_filepath(name):
        for kind, folder in dirs.items():
            if name.endswith(f" [{kind}]"):
                return name.removesuffix(f" [{kind}]"), str(folder)
        return name, None

    def get_annotated_filepath(name, default_dir=None):
        name, folder = annotated_filepath(name)
        return os.path.join(folder or default_dir or str(dirs["input"]), name)

    fp.annotated_filepath = annotated_filepath
    fp.get_annotated_filepath = get_annotated_filepath
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    assert host.in_comfyui()
    return dirs


def test_inside_comfyui_annotated_names_choose_the_folder(comfyui):
    Image.new("RGB", (4, 4)).save(comfyui["output"] / "render.png")
    assert host.input_file("dot.png") == (comfyui["input"] / "dot.png").resolve()
    assert host.input_file("dot.png [input]") == (comfyui["input"] / "dot.png").resolve()
    assert host.input_file("render.png [output]") == (comfyui["output"] / "render.png").resolve()
    assert KineFlowLoadImage.VALIDATE_INPUTS(image="render.png [output]") is True


@pytest.mark.parametrize("value", ["../secret.png", "ABSOLUTE", "../secret.png [output]", "LINK"])
def test_inside_comfyui_a_workflow_cannot_leave_comfyuis_folders(value, comfyui, folders):
    (comfyui["input"] / "link.png").symlink_to(folders / "secret.png")
    value = {"ABSOLUTE": str(folders / "secret.png"), "LINK": "link.png"}.get(value, value)
    host.configure(user_paths=[value])  # no command line inside ComfyUI: a standalone setting changes nothing
    message = KineFlowLoadImage.VALIDATE_INPUTS(image="dot.png", image_path=value)
    assert isinstance(message, str) and "upload the file to ComfyUI's input folder" in message, message
