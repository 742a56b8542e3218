"""Fuzzing hostile input: mutated shipped workflows (UI and API format), `--set` values and random safetensors headers.

Whatever the input, the command ends with exit code 0, 1 or 2, never with "unexpected internal error" or a
traceback, and writes no file unless it succeeds. Examples are derived from a fixed seed (`derandomize`), so CI
sees the same ones every time; the whole module takes well under two minutes on two cores.
"""

import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kineflow.runtime import cli, host
from kineflow.runtime.executor import OutputCache

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json")) + sorted((ROOT / "workflows" / "api").glob("*.json"))
SHAPES_API = ROOT / "workflows" / "api" / "shapes_video.json"
SHIPPED_VAE = ROOT / "weights" / "vae" / "kineflow_tiny_vae.safetensors"


def fuzz_settings(examples: int):
    # deadline: generous (a busy CI machine), it catches work that blows up, not slow examples
    return settings(max_examples=examples, deadline=30_000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setattr("kineflow.runtime.executor._DEFAULT_CACHE", OutputCache())
    for name in ("output_dir", "models_dir", "input_dir", "memory_budget"):
        monkeypatch.setattr(host._Standalone, name, getattr(host._Standalone, name))
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------- values
# Raw JSON text that no Python value dumps to: an integer past Python's int-string limit, deep nesting.
RAW_TOKENS = ["9" * 5000, "-" + "1" * 4301, "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "[" * 150 + "]" * 150,
              '{"a":' * 120 + "1" + "}" * 120, "1" * 400 + ".5"]
SPECIAL = [None, True, False, 0, -1, 1, 2**64, -(2**63), 1e308, float("nan"), float("inf"), float("-inf"), 0.5, "",
           "\u0000", "\ud800", "a" * 300, "../../etc", "/abs", "KINEFLOW_VAE", "*", "1", ["1", 0], ["1", 99],
           [["1"], 0], [{"a": 1}, 0], ["1", float("inf")], ["1", -1], {"__value__": [1, 2]}, {"__value__": None}]
json_values = st.recursive(
    st.sampled_from(SPECIAL) | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


def _mutate(data, value):
    """One random change somewhere in a JSON tree: delete, replace by a hostile value, or mark a raw token."""
    path = []
    node = value
    depth = data.draw(st.integers(1, 6), label="depth")  # 3-5 reach inputs, widget values, slots and link fields
    while isinstance(node, (dict, list)) and node and len(path) < depth:
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))), label="key")
        path.append(key)
        node = node[key]
    if not path:
        return value
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = data.draw(st.sampled_from(["delete", "replace", "raw", "wrap"]), label="op")
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = data.draw(json_values, label="value")
    elif op == "raw":
        parent[key] = RAW_MARK
    else:
        parent[key] = [parent[key]]
    return value


RAW_MARK = "\u0001raw\u0001"


def _dump(data, value) -> str:
    text = json.dumps(value)
    marker = json.dumps(RAW_MARK)
    while marker in text:
        text = text.replace(marker, data.draw(st.sampled_from(RAW_TOKENS), label="raw token"), 1)
    return text


def _main(argv) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue() + err.getvalue()


def _assert_handled(code: int, text: str) -> None:
    assert code in (0, 1, 2), text
    assert "unexpected internal error" not in text and "Traceback" not in text, text


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- workflows
@fuzz_settings(300)
@given(data=st.data())
def test_mutated_workflows_validate_and_convert_or_fail_cleanly(data, tmp_path):
    source = data.draw(st.sampled_from(WORKFLOWS), label="workflow")
    workflow = json.loads(source.read_text())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        workflow = _mutate(data, workflow)
    path = tmp_path / "fuzzed.json"
    path.write_text(_dump(data, workflow))
    before = _files(tmp_path)
    for argv in (["validate"], ["convert", "--to", "ui"], ["convert", "--to", "api"]):
        code, text = _main([*argv, str(path)])
        _assert_handled(code, text)
    assert _files(tmp_path) == before


override_values = st.sampled_from(RAW_TOKENS + ["null", "[1]", '["1", 0]', '[["1"], 0]', '{"__value__": 3}', "x",
                                                "-1", "1e400", "\"\\u0000\"", "[" * 5 + "]" * 5]) | st.text(max_size=20)


@fuzz_settings(60)
@given(data=st.data())
def test_hostile_overrides_fail_cleanly(data, tmp_path):
    source = data.draw(st.sampled_from(WORKFLOWS), label="workflow")
    target = data.draw(st.sampled_from(["1", "2", "3", "5", "6", "7", "99", "1:2", "", "\ud800"]), label="node")
    name = data.draw(st.sampled_from(["seed", "width", "cfg", "frames", "filename_prefix", "images", "nope", ""]))
    override = f"{target}.{name}={data.draw(override_values, label='value')}"
    code, text = _main(["validate", str(source), "--set", override])
    _assert_handled(code, text)


@fuzz_settings(25)
@given(data=st.data())
def test_mutated_runs_write_nothing_unless_they_succeed(data, tmp_path, monkeypatch):
    """`run`, kept cheap: a 5-frame 16x16 Shapes Video clip, with Save Video (node 3) and the links mutated."""
    workflow = json.loads(SHAPES_API.read_text())
    workflow["1"]["inputs"].update(frames=5, width=16, height=16)
    workflow["2"]["inputs"].update(width=16, height=16)
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        _mutate(data, workflow["3"] if data.draw(st.booleans(), label="save node") else workflow["2"])
    if isinstance(workflow["2"].get("inputs"), dict):
        workflow["2"]["inputs"].update(width=16, height=16)  # what Resize Frames makes stays small
    path = tmp_path / "fuzzed.json"
    path.write_text(_dump(data, workflow))
    out = Path(tempfile.mkdtemp(dir=tmp_path))  # examples share tmp_path (and would share cached outputs)
    monkeypatch.setattr("kineflow.runtime.executor._DEFAULT_CACHE", OutputCache())
    code, text = _main(["run", str(path), "--output-dir", str(out)])
    _assert_handled(code, text)
    assert bool(_files(out)) == (code == 0), text


# --------------------------------------------------------------------------- safetensors headers
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "BOOL", "Q4", "", "f32"]
entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(DTYPES) | json_values,
     "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
     "data_offsets": st.lists(st.integers(-8, 2**40), min_size=2, max_size=2) | json_values},
    optional={"extra": json_values})
headers = st.dictionaries(st.text(max_size=20), entries | json_values, max_size=5) | json_values
metadata_values = st.sampled_from(["nan", "inf", "-1", "0", "1e999", "0.5", "4", "abc", "9" * 5000]) | json_values
metadata = st.dictionaries(st.sampled_from(["scaling_factor", "norm_num_groups", "format", "x"]), metadata_values,
                           max_size=3)


def _write_safetensors(path: Path, header, meta, data_len: int) -> Path:
    if isinstance(header, dict) and meta:
        header = {**header, "__metadata__": meta}
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data_len)
    return path


@fuzz_settings(200)
@given(header=headers, meta=metadata, data_len=st.sampled_from([0, 8, 64]), as_json=st.booleans())
def test_random_safetensors_headers_inspect_cleanly(header, meta, data_len, as_json, tmp_path):
    path = _write_safetensors(tmp_path / "random.safetensors", header, meta, data_len)
    code, text = _main(["inspect", *(["--json"] if as_json else []), str(path)])
    _assert_handled(code, text)
    assert code in (0, 2), text


@fuzz_settings(40)
@given(meta=metadata)
def test_a_vae_with_random_metadata_validates_cleanly(meta, tmp_path):
    """The shipped VAE's tensors under random metadata, chosen in a workflow: validation reads its header."""
    raw = SHIPPED_VAE.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = {**header.get("__metadata__", {}), **meta}
    blob = json.dumps(header).encode()
    folder = tmp_path / "models" / "vae"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "random.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size:])
    code, text = _main(["validate", str(ROOT / "workflows" / "api" / "text_to_video.json"), "--models-dir",
                        str(tmp_path / "models"), "--set", "2.vae_name=random.safetensors"])
    _assert_handled(code, text)
    assert code in (0, 2), text
