"""Checks against a real, running ComfyUI with this pack in custom_nodes/ (skipped unless one is given).

    KINEFLOW_COMFYUI_URL=http://127.0.0.1:8188 NODE_PATH=/path/to/node_modules python -m pytest tests/test_comfyui_live.py

- every KineFlow node is in /object_info with a tooltip on every input;
- each UI workflow in workflows/, loaded into ComfyUI's own frontend in headless Chromium (playwright-core),
  exports exactly the API prompt of its twin in workflows/api/ — the frontend is the authority on the UI format.
"""

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import kineflow

URL = os.environ.get("KINEFLOW_COMFYUI_URL")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not URL, reason="set KINEFLOW_COMFYUI_URL to a running ComfyUI with KineFlow installed")


def test_every_node_is_served_with_tooltips():
    info = json.load(urllib.request.urlopen(f"{URL.rstrip('/')}/object_info", timeout=60))
    ours = {name: spec for name, spec in info.items() if name.startswith("KineFlow")}
    assert set(ours) == set(kineflow.NODE_CLASS_MAPPINGS)
    for name, spec in ours.items():
        for section in ("required", "optional"):
            for input_name, entry in spec["input"].get(section, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{name}.{input_name}"


def test_real_frontend_exports_the_api_twins():
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    files = sorted((ROOT / "workflows").glob("*.json"))
    out = subprocess.run(["node", str(ROOT / "tests/live/frontend_prompt.js"), *map(str, files)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "KINEFLOW_COMFYUI_URL": URL})
    assert out.returncode == 0, out.stderr
    exported = json.loads(out.stdout)
    strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
    for file in files:
        twin = json.loads((ROOT / "workflows" / "api" / file.name).read_text())
        assert strip(exported[str(file)]) == strip(twin), file.name


def test_web_extension_snaps_latent_widgets_in_the_real_frontend():
    if not shutil.which("node"):
        pytest.skip("node is not installed")
    out = subprocess.run(["node", str(ROOT / "tests/live/web_extension.js")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "KINEFLOW_COMFYUI_URL": URL})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"extensions": ["KineFlow.VideoLatentSizes"], "hunyuan_frames_10": 9,
                                      "width_70": 64, "sd15_frames_10": 10}


def test_native_loaders_do_not_list_the_packs_tiny_files():
    """The shipped tiny weights are for KineFlow's loaders only: ComfyUI's own loaders would always fail on them."""
    for loader in ("UNETLoader", "VAELoader", "CheckpointLoaderSimple", "CLIPLoader"):
        info = json.load(urllib.request.urlopen(f"{URL.rstrip('/')}/object_info/{loader}", timeout=60))
        assert "kineflow" not in json.dumps(info).lower(), loader


def _post(path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{URL.rstrip('/')}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
    return json.loads(text) if text.strip() else {}


def _get(path: str):
    return json.load(urllib.request.urlopen(f"{URL.rstrip('/')}{path}", timeout=60))


def test_comfyui_manages_kineflow_models_and_frees_them_on_request():
    """After a run ComfyUI's model manager lists the KineFlow models; asking it to free memory unloads them."""
    prompt = json.loads((ROOT / "workflows" / "api" / "text_to_video.json").read_text())
    prompt["6"]["inputs"]["seed"] = int(time.time()) % 100000  # a new seed: the sampler really runs
    prompt_id = _post("/prompt", {"prompt": prompt})["prompt_id"]
    deadline = time.monotonic() + 300
    while prompt_id not in _get(f"/history/{prompt_id}"):
        assert time.monotonic() < deadline, "the workflow did not finish"
        time.sleep(1)
    assert _get(f"/history/{prompt_id}")[prompt_id]["status"]["status_str"] == "success"
    names = {m["name"] for m in _get("/kineflow/loaded_models")}
    assert "kineflow_tiny_dit.safetensors" in names, names
    _post("/free", {"unload_models": True})
    deadline = time.monotonic() + 30
    while _get("/kineflow/loaded_models"):
        assert time.monotonic() < deadline, _get("/kineflow/loaded_models")
        time.sleep(0.5)
