"""The kineflow command: exit codes, messages, --debug, and the malformed-workflow corpus."""

import json
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
