"""The kineflow command: exit codes, messages, --debug, start-up, and the malformed-workflow corpus."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kineflow.runtime import cli, host
from kineflow.runtime.executor import OutputCache

from conftest import DATA_DIR

WORKFLOWS = DATA_DIR / "workflows"
ROOT = Path(__file__).resolve().parent.parent
MALFORMED = DATA_DIR / "malformed"
MANIFEST = json.loads((MALFORMED / "manifest.json").read_text())


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Fresh output cache and standalone folders per test."""
    monkeypatch.setattr("kineflow.runtime.executor._DEFAULT_CACHE", OutputCache())
    for name in ("output_dir", "models_dir", "input_dir"):
        monkeypatch.setattr(host._Standalone, name, getattr(host._Standalone, name))
    monkeypatch.chdir(tmp_path)


def _run(argv, nodes, capsys):
    code = cli.main(argv, node_classes=nodes)
    out, err = capsys.readouterr()
    return code, out, err


def test_corpus_is_large_and_complete():
    files = {p.name for p in MALFORMED.iterdir()} - {"manifest.json"}
    assert len(files) >= 40
    assert files == set(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_malformed_workflow_exits_2_with_clear_message(name, fixture_nodes, capsys, calls):
    for command in ("validate", "run"):
        code, out, err = _run([command, str(MALFORMED / name)], fixture_nodes, capsys)
        assert code == 2, err
        assert "Traceback" not in err + out
        assert err.startswith("error: ")
        for expected in MANIFEST[name]:
            assert expected in err
    assert calls == []  # nothing ran


def test_run_succeeds(fixture_nodes, capsys, calls, tmp_path):
    code, out, err = _run(["run", str(WORKFLOWS / "ui_v04.json"), "--set", "3.filename_prefix=cli",
                           "--output-dir", str(tmp_path / "o")], fixture_nodes, capsys)
    assert code == 0, err
    assert out == 'node 3: {"images": [{"filename": "cli_00001.png"}]}\n'
    assert "[4/4] node 3 TSave" in err and "done: 4 nodes" in err
    assert dict(calls)["TSave"]["output_dir"] == tmp_path / "o"
    assert host.output_dir() != tmp_path / "o", "a run's folders apply to that run only"


def test_validate_succeeds(fixture_nodes, capsys):
    code, out, err = _run(["validate", str(WORKFLOWS / "basic_api.json")], fixture_nodes, capsys)
    assert code == 0 and "valid, 3 of 4 nodes would run" in out and err == ""


def test_every_validation_error_is_one_line(fixture_nodes, capsys):
    code, _, err = _run(["validate", str(MALFORMED / "many_errors.json")], fixture_nodes, capsys)
    lines = err.splitlines()
    assert code == 2 and lines[0] == "error: workflow is invalid (7 problem(s)):"
    assert "  node 1 (TImage) input 'width': Value 0 smaller than min of 1: width [value_smaller_than_min]" in lines
    assert len(lines) == 8


def test_bad_override_exits_2(fixture_nodes, capsys):
    code, _, err = _run(["run", str(WORKFLOWS / "basic_api.json"), "--set", "2.sead=1"], fixture_nodes, capsys)
    assert code == 2 and "has no input 'sead'" in err


def _failing_workflow(tmp_path, class_type):
    prompt = json.loads((WORKFLOWS / "basic_api.json").read_text())
    prompt["5"] = {"class_type": class_type, "inputs": {"image": ["1", 0]}}
    prompt["3"]["inputs"]["images"] = ["5", 0]
    path = tmp_path / f"{class_type}.json"
    path.write_text(json.dumps(prompt))
    return str(path)


def test_runtime_failure_exits_1_without_traceback(fixture_nodes, capsys, tmp_path):
    code, _, err = _run(["run", _failing_workflow(tmp_path, "TFail")], fixture_nodes, capsys)
    assert code == 1
    assert "error: node 5 (TFail) failed: ValueError: tensor shapes do not line up" in err
    assert "--debug" in err and "Traceback" not in err


def test_debug_prints_traceback(fixture_nodes, capsys, tmp_path):
    path = _failing_workflow(tmp_path, "TFail")
    for argv in (["--debug", "run", path], ["run", path, "--debug"]):
        code, _, err = _run(argv, fixture_nodes, capsys)
        assert code == 1 and "Traceback" in err and "ValueError: tensor shapes" in err


def test_interruption_exits_130(fixture_nodes, capsys, tmp_path):
    code, _, err = _run(["run", _failing_workflow(tmp_path, "TStop")], fixture_nodes, capsys)
    assert code == 130 and "interrupted" in err and "Traceback" not in err


def test_keyboard_interrupt_exits_130(fixture_nodes, capsys, monkeypatch):
    def press_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_workflow", press_ctrl_c)
    code, _, err = _run(["run", str(WORKFLOWS / "basic_api.json")], fixture_nodes, capsys)
    assert code == 130 and "interrupted" in err


def test_unexpected_error_is_one_paragraph(fixture_nodes, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "run_workflow", broken)
    code, _, err = _run(["run", str(WORKFLOWS / "basic_api.json")], fixture_nodes, capsys)
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: boom" in err


def test_nodes_lists_types_inputs_outputs(fixture_nodes, capsys):
    code, out, _ = _run(["nodes"], fixture_nodes, capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(fixture_nodes)
    assert ("TNoise  inputs: image:IMAGE, seed:INT, strength:FLOAT, [mask:IMAGE], [steps:INT]  "
            "outputs: IMAGE:IMAGE, INT:INT") in lines
    assert "TSave (output node)  inputs: images:IMAGE, filename_prefix:STRING, [label:STRING]  outputs: -" in lines


def test_usage_errors_exit_2(fixture_nodes, capsys):
    assert cli.main([], node_classes=fixture_nodes) == 2
    assert cli.main(["frobnicate"], node_classes=fixture_nodes) == 2
    assert cli.main(["--help"], node_classes=fixture_nodes) == 0
    capsys.readouterr()


def test_commands_are_pluggable():
    assert {"run", "validate", "nodes", "inspect"} <= {c.name for c in cli.COMMANDS}
    assert all(callable(c.add_arguments) and callable(c.handler) for c in cli.COMMANDS)


def test_run_ends_by_naming_the_saved_file(tmp_path, capsys):
    code = cli.main(["run", str(ROOT / "workflows" / "api" / "shapes_video.json"), "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0
    saved = Path(err.strip().splitlines()[-1].removeprefix("saved "))
    assert saved.is_file() and saved.parent.parent == tmp_path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("kineflow ")


# --------------------------------------------------------------------------- start-up
# Runs `kineflow ARGS` in a fresh interpreter, then reports which heavy packages the command imported.
_IMPORTS_OF = """
import sys
from kineflow.runtime.cli import main
code = main(sys.argv[1:])
print("exit", code, "heavy:", *sorted(m for m in ("torch", "av", "PIL") if m in sys.modules), file=sys.stderr)
"""


def _tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "hyvid")
    writer.add_tensor("img_in.proj.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["run", "--help"],
    ["inspect", str(ROOT / "weights" / "vae" / "kineflow_tiny_vae.safetensors")],
    ["inspect", "--json", "GGUF"],
    ["convert", str(ROOT / "workflows" / "text_to_video.json"), "--to", "api"],
    ["validate", str(ROOT / "workflows" / "api" / "text_to_video.json")],
    ["nodes"],
], ids=["help", "run-help", "inspect", "inspect-gguf", "convert", "validate", "nodes"])
def test_commands_that_compute_nothing_start_without_torch(argv, tmp_path):
    argv = [str(_tiny_gguf(tmp_path / "tiny.gguf")) if a == "GGUF" else a for a in argv]
    done = subprocess.run([sys.executable, "-c", _IMPORTS_OF, *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.stderr.splitlines()[-1] == "exit 0 heavy:", done.stderr


def test_help_names_the_default_models_folder(capsys):
    assert cli.main(["run", "--help"]) == 0
    assert "./kineflow_models" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see torch being loaded")
def test_ctrl_c_while_starting_exits_130_without_a_traceback(tmp_path):
    """SIGINT while the command is still importing torch (its shared library is being mapped) ends it like a later
    Ctrl-C: exit 130 and one line. Should torch be loaded before the signal arrives, it lands in the run: same."""
    proc = subprocess.Popen([sys.executable, "-m", "kineflow", "run", str(ROOT / "workflows" / "api" /
                            "text_to_video.json"), "--output-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the command ended before loading torch"
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.splitlines()[-1] == "error: interrupted; nothing more was run."


# --------------------------------------------------------------------------- missing and damaged model files
def test_missing_model_file_names_the_folders_searched_and_where_it_belongs(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    code = cli.main(["validate", str(ROOT / "workflows" / "api" / "hunyuan_video_t2v.json"), "--models-dir",
                     str(missing)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"warning: the models folder {missing} (--models-dir) does not exist")
    [line] = [l for l in err.splitlines() if "'hunyuan_video_t2v_720p_bf16.safetensors'" in l]
    assert "input 'model_name'" in line
    assert f"not found in {missing / 'diffusion_models'}, {missing / 'unet'} or the shipped models" in line
    assert f"it belongs in {missing / 'diffusion_models'}/" in line and "'Where model files go'" in line


def test_models_folder_from_the_environment_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KINEFLOW_MODELS", str(tmp_path / "gone"))
    assert cli.main(["validate", str(ROOT / "workflows" / "api" / "shapes_video.json")]) == 0
    assert f"{tmp_path / 'gone'} ($KINEFLOW_MODELS) does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["missing.safetensors", "damaged.safetensors"])
def test_eval_with_a_missing_or_damaged_model_exits_2(model, tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "diffusion_models" / "damaged.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}x")
    code = cli.main(["eval", "-n", "1", "--steps", "1", "--model", model, "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and model in err


# --------------------------------------------------------------------------- constants where a link belongs
@pytest.mark.parametrize("value", ["1", '"abc"', "null", "[1, 2, 3]", '["1", 0]'])
def test_set_replacing_a_link_with_a_constant_fails_validation(value, tmp_path, capsys):
    code = cli.main(["run", str(ROOT / "workflows" / "api" / "text_to_video.json"), "--set", f"6.model={value}",
                     "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "node 6 (KineFlowSampler) input 'model': Input needs a link from a node's KINEFLOW_VIDEO_MODEL output" in err

