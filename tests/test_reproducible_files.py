"""Same workflow, same seed, same file: every shipped workflow that runs on the shipped models writes byte-identical
files in every format from two separate processes. (hunyuan_video_t2v.json and animatediff_sd15.json need the
full-size models, which no test has.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("mp4", "webm", "gif", "webp")


def _with_every_format(workflow: dict) -> dict:
    """The workflow with its Save Video node repeated once per format (same frames, one file each)."""
    (save_id,) = [k for k, node in workflow.items() if node["class_type"] == "KineFlowSaveVideo"]
    save = workflow.pop(save_id)
    for fmt in FORMATS:
        workflow[f"{save_id}_{fmt}"] = {"class_type": "KineFlowSaveVideo", "inputs": {
            **save["inputs"], "format": fmt, "filename_prefix": f"repro_{fmt}"}}
    return workflow


@pytest.mark.parametrize("name", ["text_to_video.json", "animatediff_tiny.json", "shapes_video.json"])
def test_two_processes_write_byte_identical_files(name, tmp_path):
    workflow = tmp_path / name
    workflow.write_text(json.dumps(_with_every_format(json.loads((ROOT / "workflows" / "api" / name).read_text()))))
    files = []
    for run in ("a", "b"):
        out = subprocess.run([sys.executable, "-m", "kineflow.runtime.cli", "run", str(workflow), "--output-dir",
                              str(tmp_path / run)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONHASHSEED": run == "a" and "1" or "2"})
        assert out.returncode == 0, out.stderr
        files.append({p.name: p.read_bytes() for p in (tmp_path / run).rglob("repro_*")})
    assert sorted(files[0]) == sorted(files[1]) and len(files[0]) == len(FORMATS)
    for filename in files[0]:
        assert files[0][filename] == files[1][filename], filename
