"""The host module inside ComfyUI, with a stand-in for ComfyUI's `folder_paths` (the real one is checked live)."""

import sys
import types
from pathlib import Path

import pytest
import torch

from kineflow.runtime import host


@pytest.fixture
def fake_comfyui(tmp_path, monkeypatch):
    """A `folder_paths` with ComfyUI's registry functions and its standard folder kinds, under tmp_path/models."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {kind: ([str(tmp_path / "models" / kind)], {".safetensors"})
                                 for kind in ("diffusion_models", "vae", "text_encoders", "checkpoints", "loras", "clip")}

    def add_model_folder_path(kind, path, is_default=False):
        paths, exts = fp.folder_names_and_paths.setdefault(kind, ([], set()))
        if path not in paths:
            paths.append(path)

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda kind: list(fp.folder_names_and_paths[kind][0])
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    monkeypatch.setitem(sys.modules, "comfy.model_management", types.ModuleType("comfy.model_management"))
    return fp


def test_shipped_weights_stay_out_of_comfyuis_native_loaders(fake_comfyui):
    host.register_comfyui_folders()
    registered = [Path(p) for paths, _ in fake_comfyui.folder_names_and_paths.values() for p in paths]
    assert not [p for p in registered if host.SHIPPED_WEIGHTS_DIR in (p, *p.parents)], registered
    # ComfyUI gains the AnimateDiff folder kinds it does not know
    assert fake_comfyui.get_folder_paths("animatediff_models") == [str(Path(fake_comfyui.models_dir) / "animatediff_models")]
    # ...and KineFlow's own loaders still list and find the shipped models
    assert "kineflow_tiny_dit.safetensors" in host.list_models("diffusion_models")
    assert "kineflow_tiny_mm.safetensors" in host.list_models("animatediff_models")
    assert host.model_path("vae", "kineflow_tiny_vae.safetensors").is_file()


def test_users_files_come_before_the_shipped_ones(fake_comfyui):
    host.register_comfyui_folders()
    dirs = host._search_dirs("diffusion_models")
    assert dirs[-1] == host.SHIPPED_WEIGHTS_DIR / "diffusion_models"
    assert dirs[0] == Path(fake_comfyui.models_dir) / "diffusion_models"


def test_missing_model_inside_comfyui_names_comfyuis_folder(fake_comfyui):
    host.register_comfyui_folders()
    message = host.missing_model("vae", "hunyuan_video_vae_bf16.safetensors")
    home = Path(fake_comfyui.models_dir) / "vae"
    assert f"not found in {home} or the shipped models (available: kineflow_tiny_vae.safetensors)" in message
    assert f"it belongs in {home}/," in message and "--models-dir" not in message
    assert host.missing_model("vae", "kineflow_tiny_vae.safetensors") is None


def test_default_models_folder_is_not_a_folder_of_the_pack():
    """Run from the repository, ./models would be the pack's own source package."""
    assert not (host.PACK_DIR / host.DEFAULT_MODELS_DIR).exists()
    assert host.DEFAULT_MODELS_DIR not in {p.name for p in host.PACK_DIR.iterdir()}


def test_tiny_random_models_never_take_a_shipped_models_name(tmp_path):
    """A models folder is searched before weights/: a random file of a shipped name would replace that model."""
    from kineflow.training import tiny_models, tiny_sd

    shipped = {p.name for p in host.SHIPPED_WEIGHTS_DIR.glob("*/*")}
    written = {p.name for p in tiny_models.write_models(tmp_path / "hv").values()}
    written |= {p.name for p in tiny_sd.write_models(tmp_path / "ad").values()}
    assert written and not written & shipped


@pytest.mark.parametrize("device, message", [("cuda", "sees no CUDA device"), ("tpu", "expected one of"),
                                             ("xla", "not supported")])
def test_a_device_this_machine_lacks_is_a_clear_input_error(device, message, capsys, tmp_path):
    from kineflow.runtime import cli

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = cli.main(["run", "--device", device, "workflows/api/text_to_video.json", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_kineflow_device_environment_variable_chooses_the_compute_device(monkeypatch):
    monkeypatch.setenv("KINEFLOW_DEVICE", "meta")
    assert host.compute_device() == torch.device("meta") and host.is_dry_run()
    monkeypatch.setenv("KINEFLOW_DEVICE", "cpu")
    assert host.compute_device() == torch.device("cpu")
    with host.configured(device="meta"):  # --device wins over the variable
        assert host.compute_device() == torch.device("meta")
