"""Stop signals standalone: SIGINT, SIGTERM and SIGHUP while a video is being written stop the run with 130, 143 and
129, leave no temporary file and no claimed output name, and print no traceback, even when Ctrl-C comes twice.
Inside ComfyUI the pack installs no signal handler."""

import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kineflow.runtime import cli

ROOT = Path(__file__).resolve().parent.parent

# `kineflow run` as the program, with Save Video's encoder paused inside the atomic write (after the frames are
# encoded into the temporary file, before the rename); markers on stderr tell the test where the run is. KF_SLOW
# makes the write's cleanup and the interpreter's exit (a library's atexit callback) last that many seconds.
DRIVER = """
import atexit, os, sys, time
from kineflow.runtime import cli, media
slow = float(os.environ["KF_SLOW"])
encode = media._write_av
def paused(*args, **kwargs):
    encode(*args, **kwargs)
    try:
        print("KF-WRITING", flush=True, file=sys.stderr)
        time.sleep(120)
    finally:
        print("KF-CLEANING", flush=True, file=sys.stderr)
        time.sleep(slow)
def exiting():
    print("KF-EXITING", flush=True, file=sys.stderr)
    time.sleep(slow)
media._write_av = paused
atexit.register(exiting)
sys.argv = ["kineflow", *sys.argv[1:]]
sys.exit(cli.main())
"""


def _start_run(out: Path, slow: float = 0.0) -> subprocess.Popen:
    args = ["run", str(ROOT / "workflows" / "api" / "shapes_video.json"), "--output-dir", str(out),
            "--set", "1.frames=5", "--set", "1.width=32", "--set", "1.height=32", "--set", "2.width=32",
            "--set", "2.height=32"]
    env = {**os.environ, "KF_SLOW": str(slow)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(proc: subprocess.Popen, marker: str, seen: list[str]) -> None:
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(marker):
            return
    pytest.fail(f"the run ended before {marker}:\n{''.join(seen)}")


def _files_left(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir())


@pytest.mark.parametrize("name,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_stop_signal_during_the_write_cleans_up_and_exits_with_its_code(name, code, tmp_path):
    out = tmp_path / "output"
    proc = _start_run(out)
    seen: list[str] = []
    _wait_for(proc, "KF-WRITING", seen)
    left = _files_left(out)  # the claimed name and the temporary file being written
    assert any(".tmp.mp4" in f for f in left) and "KineFlow/shapes_00001_.mp4" in left, left
    proc.send_signal(getattr(signal, name))
    stderr = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=60) == code, stderr
    by = "" if name == "SIGINT" else f" by {name}"
    assert f"error: interrupted{by}; nothing more was run." in stderr and "Traceback" not in stderr
    assert _files_left(out) == []


@pytest.mark.parametrize("moment", ["KF-CLEANING", "KF-EXITING"])
def test_a_second_ctrl_c_during_the_cleanup_or_the_exit_is_ignored(moment, tmp_path):
    out = tmp_path / "output"
    proc = _start_run(out, slow=1.0)
    seen: list[str] = []
    _wait_for(proc, "KF-WRITING", seen)
    proc.send_signal(signal.SIGINT)
    _wait_for(proc, moment, seen)
    proc.send_signal(signal.SIGINT)  # lands in the (slow) cleanup, or in the interpreter's exit
    stderr = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert _files_left(out) == []


def test_ctrl_c_twice_in_a_row_exits_130_quietly(tmp_path):
    out = tmp_path / "output"
    proc = _start_run(out)
    seen: list[str] = []
    _wait_for(proc, "KF-WRITING", seen)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    stderr = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=60) == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert _files_left(out) == []


# --------------------------------------------------------------------------- who owns the signals
class _Probe:
    """An output node that records the SIGTERM and SIGINT handlers in force while it runs."""

    seen: list = []
    CATEGORY = "test"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # never served from the executor's cache

    def run(self):
        _Probe.seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return {"ui": {}, "result": ()}


@pytest.fixture
def probe_workflow(tmp_path):
    _Probe.seen = []
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"1": {"class_type": "Probe", "inputs": {}}}))
    return path


def test_standalone_the_command_handles_stop_signals_and_gives_them_back(probe_workflow, capsys):
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    assert cli.main(["run", str(probe_workflow)], node_classes={"Probe": _Probe}) == 0
    assert _Probe.seen[0][0] is not before[0] and _Probe.seen[0][1] is not before[1]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_inside_comfyui_no_signal_handler_is_installed(probe_workflow, monkeypatch, tmp_path, capsys):
    management = types.ModuleType("comfy.model_management")
    management.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
    management.throw_exception_if_processing_interrupted = lambda: None
    management.get_torch_device = lambda: torch.device("cpu")
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_output_directory = lambda: str(tmp_path / "output")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(update_absolute=lambda *a, **k: None)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = management, utils
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", management)
    monkeypatch.setitem(sys.modules, "comfy.utils", utils)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    assert cli.main(["run", str(probe_workflow)], node_classes={"Probe": _Probe}) == 0
    assert _Probe.seen == [before]
