"""Hostile workflows: validation refuses what would fail later (exit 2, naming the node and input), in `kineflow` and,
where the pack can, inside ComfyUI; what validation cannot know stops the run cleanly. Nothing is written on failure."""

import inspect
import json
import math
import struct
from pathlib import Path

import pytest
import torch

from kineflow import NODE_CLASS_MAPPINGS
from kineflow.errors import KineFlowError, ModelFileError
from kineflow.models import checkpoints
from kineflow.runtime import cli, executor, host
from kineflow.runtime.executor import OutputCache, execution_order
from kineflow.runtime.validation import combo_options, declared_inputs, format_error, validate_prompt
from kineflow.runtime.workflow import is_widget_type
from kineflow.samplers.sampling import FlowMatching, sample

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "workflows" / "api"
TEXT_TO_VIDEO = API / "text_to_video.json"  # 5 Empty Video Latent, 6 Sampler, 7 VAE Decode, 8 Save Video
SHAPES = API / "shapes_video.json"  # 1 Shapes Video, 2 Resize Frames, 3 Save Video


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setattr("kineflow.runtime.executor._DEFAULT_CACHE", OutputCache())
    for name in ("output_dir", "models_dir", "input_dir", "memory_budget"):
        monkeypatch.setattr(host._Standalone, name, getattr(host._Standalone, name))
    monkeypatch.chdir(tmp_path)


def _main(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "unexpected internal error" not in err and "Traceback" not in err, err
    return code, out + err


def _written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


# --------------------------------------------------------------------------- one node, stub neighbours
def _stub_source(kind):
    return type(f"Source_{kind}", (), {"RETURN_TYPES": (kind,), "FUNCTION": "f",
                                       "INPUT_TYPES": classmethod(lambda cls: {"required": {}})})


class _Sink:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "f"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",)}}


def _default(kind, opts):
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, (list, tuple)):
        return kind[0] if kind else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


def _single_node_prompt(class_type: str) -> tuple[dict, dict]:
    """The node at its defaults, each link input fed by a stub node of the right type, its output into a stub sink."""
    cls = NODE_CLASS_MAPPINGS[class_type]
    classes = dict(NODE_CLASS_MAPPINGS, Sink=_Sink)
    prompt = {"1": {"class_type": class_type, "inputs": {}}, "0": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    for index, (name, (_, kind, opts)) in enumerate(declared_inputs(cls).items()):
        if is_widget_type(kind):
            prompt["1"]["inputs"][name] = _default(kind, opts)
        else:
            source = _stub_source(kind)
            classes[source.__name__] = source
            prompt[f"s{index}"] = {"class_type": source.__name__, "inputs": {}}
            prompt["1"]["inputs"][name] = [f"s{index}", 0]
    return prompt, classes


def _bad_values():
    """(node class, input, a value its declaration refuses) for every limit and choice list of every node."""
    cases = []
    for class_type, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        for name, (_, kind, opts) in declared_inputs(cls).items():
            if kind in ("INT", "FLOAT"):
                if "min" in opts:
                    cases.append((class_type, name, opts["min"] - 1))
                if "max" in opts:
                    cases.append((class_type, name, opts["max"] + 1))
                if kind == "FLOAT":
                    cases += [(class_type, name, math.nan), (class_type, name, math.inf)]
            elif combo_options(kind, opts) is not None:
                cases.append((class_type, name, "not-a-choice"))
    return cases


BAD_VALUES = _bad_values()


def test_every_node_has_limits_to_check():
    assert len(BAD_VALUES) > 100
    assert {c for c, _, _ in BAD_VALUES} >= {"KineFlowShapesVideo", "KineFlowSampler", "KineFlowSaveVideo"}


@pytest.mark.parametrize("class_type,name,value", BAD_VALUES, ids=[f"{c}.{n}={v}" for c, n, v in BAD_VALUES])
def test_every_declared_limit_and_choice_is_enforced(class_type, name, value):
    prompt, classes = _single_node_prompt(class_type)
    baseline = validate_prompt(json.loads(json.dumps(prompt)), classes)
    prompt["1"]["inputs"][name] = value
    new = [format_error(e) for e in validate_prompt(prompt, classes) if e not in baseline and e["node_id"] == "1"]
    assert any(name in line for line in new), (new, baseline)


@pytest.mark.parametrize("class_type,name,value", BAD_VALUES, ids=[f"{c}.{n}={v}" for c, n, v in BAD_VALUES])
def test_inside_comfyui_the_same_values_are_refused(class_type, name, value):
    """ComfyUI checks min/max/lists itself, except for the inputs VALIDATE_INPUTS names (then the node must), and
    converts INT with int() (NaN and infinity fail there) but lets a NaN FLOAT through its checks: a FLOAT input must
    be named, and its node's VALIDATE_INPUTS must refuse the value."""
    cls = NODE_CLASS_MAPPINGS[class_type]
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    spec = inspect.getfullargspec(validate) if validate else None
    named = spec is not None and (name in spec.args or spec.varkw is not None)
    _, kind, _ = declared_inputs(cls)[name]
    if kind == "FLOAT":
        assert named, f"{class_type}.{name} is a FLOAT that ComfyUI would pass as NaN; name it in VALIDATE_INPUTS"
    if named:
        assert validate(**{name: value}) is not True


@pytest.mark.parametrize("override,where", [
    ("1.width=100000", "width"), ("1.width=2000", "width"), ("1.height=2000", "height"), ("1.frames=257", None),
    ("1.shape=\"hexagon\"", "shape"), ("1.direction=\"sideways\"", "direction"), ("1.seed=-1", "seed"),
    ("1.frames=258", "frames"), ("1.colour=\"mauve\"", "colour"),
])
def test_shapes_video_limits(override, where, capsys):
    argv = ["validate", SHAPES, "--set", override]
    if where is None:  # 257 frames are allowed: with 2000x2000 the size is what is refused
        argv += ["--set", "1.width=2000", "--set", "1.height=2000"]
        where = "width"
    code, text = _main(argv, capsys)
    assert code == 2 and "node 1 (KineFlowShapesVideo)" in text and where in text, text


# --------------------------------------------------------------------------- non-finite numbers
@pytest.mark.parametrize("node,name", [("6", "cfg"), ("6", "shift"), ("6", "embedded_guidance"), ("6", "denoise"),
                                       ("8", "frame_rate"), ("5", "width"), ("6", "seed")])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_naming_node_and_input(node, name, value, capsys, tmp_path):
    for command in ("validate", "run"):
        code, text = _main([command, TEXT_TO_VIDEO, "--set", f"{node}.{name}={value}", "--output-dir", tmp_path / "o"]
                           if command == "run" else [command, TEXT_TO_VIDEO, "--set", f"{node}.{name}={value}"], capsys)
        assert code == 2 and f"node {node} (" in text and name in text, text
    assert not _written(tmp_path / "o")


def _vae_with_metadata(folder: Path, **metadata) -> Path:
    raw = (ROOT / "weights" / "vae" / "kineflow_tiny_vae.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    blob = json.dumps(header).encode()
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    path = folder / "vae" / "hostile_vae.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size:])
    return path


@pytest.mark.parametrize("key,value", [("scaling_factor", "nan"), ("scaling_factor", "inf"), ("scaling_factor", "0"),
                                       ("norm_num_groups", "0"), ("norm_num_groups", "2.5")])
def test_unusable_vae_metadata_is_refused_before_anything_loads(key, value, capsys, tmp_path):
    _vae_with_metadata(tmp_path / "models", **{key: value})
    argv = [TEXT_TO_VIDEO, "--models-dir", tmp_path / "models", "--set", "2.vae_name=hostile_vae.safetensors"]
    for command in ("validate", "run"):
        code, text = _main([command, *argv, *(["--output-dir", tmp_path / "o"] if command == "run" else [])], capsys)
        assert code == 2 and "'hostile_vae.safetensors' has metadata" in text and key in text, text
    assert not _written(tmp_path / "o")


def test_metadata_numbers_of_a_gguf_text_encoder_are_checked():
    header = checkpoints.Header(Path("llm.gguf"), {}, {"llama.rope.freq_base": "nan",
                                                       "llama.attention.head_count": "8"})
    with pytest.raises(ModelFileError, match="'llm.gguf' has metadata llama.rope.freq_base"):
        checkpoints.metadata_numbers(header, "llama_text")
    header.metadata["llama.rope.freq_base"] = "500000"
    assert checkpoints.metadata_numbers(header, "llama_text") == {"llama.rope.freq_base": 500000.0,
                                                                  "llama.attention.head_count": 8}


def test_a_latent_that_turns_non_finite_stops_sampling_within_a_step():
    calls = []

    def denoiser(x, sigma):
        calls.append(float(sigma[0]))
        return x * (math.nan if len(calls) == 3 else 0.5)

    sigmas = torch.linspace(1, 0, 9)
    with pytest.raises(KineFlowError, match="NaN or infinite values after step 3 of 8"):
        sample(FlowMatching(), denoiser, torch.ones(1, 4, 1, 2, 2), sigmas, "euler")
    assert len(calls) == 4  # the flag of step 3 is read during step 4: the device never waits on the check


def test_a_run_whose_latent_turns_non_finite_exits_1_and_writes_nothing(monkeypatch, capsys, tmp_path):
    from kineflow.runtime.video_models import HunyuanVideoModel

    monkeypatch.setattr(HunyuanVideoModel, "net_fn", lambda self, x, timestep, **kw: torch.full_like(x, math.inf))
    code, text = _main(["run", TEXT_TO_VIDEO, "--output-dir", tmp_path / "o", "--set", "6.steps=2",
                        "--set", "5.width=32", "--set", "5.height=32", "--set", "5.frames=1"], capsys)
    assert code == 1 and "node 6 (KineFlowSampler) failed: sampling stopped" in text, text
    assert not _written(tmp_path / "o")


# --------------------------------------------------------------------------- crash classes
def _ui(name: str) -> dict:
    return json.loads((ROOT / "workflows" / name).read_text())


def _write(tmp_path: Path, workflow, text: str | None = None) -> Path:
    path = tmp_path / "hostile.json"
    path.write_text(text if text is not None else json.dumps(workflow))
    return path


def _shapes_ui_with(change) -> dict:
    workflow = _ui("shapes_video.json")
    change(workflow)
    return workflow


def _set_first_link_slot(workflow, value):
    link = workflow["links"][0]
    if isinstance(link, list):
        link[2] = value
    else:
        link["origin_slot"] = value


def _first_linked_input(workflow) -> dict:
    return next(slot for node in workflow["nodes"] for slot in node.get("inputs") or [] if slot.get("link") is not None)


DIGITS = "9" * 5000
CRASH_CLASSES = {
    "5000-digit integer": lambda tmp: _write(tmp, None, SHAPES.read_text().replace('"seed": 0', f'"seed": {DIGITS}')),
    "link source a list": lambda tmp: _write(tmp, _api_with("2", "images", [["1"], 0])),
    "link source an object": lambda tmp: _write(tmp, _api_with("2", "images", [{"id": "1"}, 0])),
    "link slot a float": lambda tmp: _write(tmp, _api_with("2", "images", ["1", 0.5])),
    "UI link slot Infinity": lambda tmp: _write(tmp, None, json.dumps(_shapes_ui_with(
        lambda w: _set_first_link_slot(w, 1e999)))),
    "UI output links a number": lambda tmp: _write(tmp, _shapes_ui_with(
        lambda w: w["nodes"][0]["outputs"][0].update(links=7))),
    "UI linked input without a name": lambda tmp: _write(tmp, _shapes_ui_with(
        lambda w: _first_linked_input(w).pop("name"))),
    "UI negative link slot": lambda tmp: _write(tmp, _shapes_ui_with(lambda w: _set_first_link_slot(w, -1))),
    "deep nesting": lambda tmp: _write(tmp, None, '{"1": ' + "[" * 50000 + "]" * 50000 + "}"),
}


def _api_with(node: str, name: str, value) -> dict:
    workflow = json.loads(SHAPES.read_text())
    workflow[node]["inputs"][name] = value
    return workflow


@pytest.mark.parametrize("case", list(CRASH_CLASSES))
def test_hostile_workflows_are_exit_2_with_a_clear_message(case, capsys, tmp_path):
    path = CRASH_CLASSES[case](tmp_path)
    for command in ("validate", "run"):
        code, text = _main([command, path, "--output-dir", tmp_path / "o"] if command == "run" else [command, path],
                           capsys)
        assert code == 2 and text.startswith("error: "), text
    assert not _written(tmp_path / "o")


@pytest.mark.parametrize("node_id", ["9" * 5000, "\u00b2", "007"])
def test_any_node_id_orders(node_id, capsys, tmp_path):
    """Ids sort numerically without int(): a 5000-digit id, or a character str.isdigit() accepts that int() refuses."""
    workflow = json.loads(SHAPES.read_text())
    workflow[node_id] = workflow.pop("1")
    workflow["2"]["inputs"]["images"] = [node_id, 0]
    code, text = _main(["validate", _write(tmp_path, workflow)], capsys)
    assert code == 0, text
    code, text = _main(["validate", _write(tmp_path, workflow), "--set", "4.seed=1"], capsys)
    assert code == 2 and "there is no node '4'" in text, text


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 5000 + "]" * 5000])
def test_hostile_override_values_are_exit_2(value, capsys):
    code, text = _main(["validate", SHAPES, "--set", f"1.seed={value}"], capsys)
    assert code == 2 and "--set 1.seed" in text, text


def test_undeclared_inputs_are_ignored_with_a_note(capsys, tmp_path, caplog):
    workflow = json.loads(SHAPES.read_text())
    workflow["1"]["inputs"].update(frames=5, width=16, height=16, sparkle=3, glitter=["2", 0])
    workflow["2"]["inputs"].update(width=16, height=16)
    path = _write(tmp_path, workflow)
    code, text = _main(["validate", path], capsys)
    assert code == 0, text
    note = "node 1 (KineFlowShapesVideo) has input(s) 'sparkle', 'glitter' that its class does not declare"
    assert note in caplog.text
    code, text = _main(["run", path, "--output-dir", tmp_path / "o"], capsys)
    assert code == 0 and len(_written(tmp_path / "o")) == 1, text


# --------------------------------------------------------------------------- size
def _chain(length: int) -> dict:
    prompt = {"0": {"class_type": "KineFlowShapesVideo", "inputs": {
        "shape": "circle", "colour": "red", "background": "blue", "direction": "right", "scale_change": "none",
        "frames": 1, "width": 16, "height": 16, "seed": 0}}}
    for i in range(1, length + 1):
        prompt[str(i)] = {"class_type": "KineFlowEveryNthFrame", "inputs": {"images": [str(i - 1), 0], "n": 1,
                                                                             "offset": 0}}
    prompt["save"] = {"class_type": "KineFlowSaveVideo", "inputs": {
        "images": [str(length), 0], "frame_rate": 8.0, "filename_prefix": "chain", "format": "gif", "quality": 80,
        "loop_count": 0, "save_metadata": False}}
    return prompt


def test_a_20000_node_chain_validates_reading_each_class_once(monkeypatch):
    """Linear work: no recursion along the chain (it would pass Python's limit) and one INPUT_TYPES read per class;
    execution order and cache keys are linear too."""
    reads = []
    for name in ("KineFlowEveryNthFrame", "KineFlowShapesVideo", "KineFlowSaveVideo"):
        cls = NODE_CLASS_MAPPINGS[name]
        original = cls.INPUT_TYPES.__func__
        monkeypatch.setattr(cls, "INPUT_TYPES", classmethod(lambda c, f=original: reads.append(c) or f(c)))
    prompt = _chain(20_000)
    assert validate_prompt(prompt, NODE_CLASS_MAPPINGS) == []
    validation_reads = len(reads)
    order = execution_order(prompt, NODE_CLASS_MAPPINGS)
    assert order[0] == "0" and order[-1] == "save" and len(order) == 20_002
    keys = executor._signatures(prompt, order, NODE_CLASS_MAPPINGS, None, OutputCache())
    assert len(set(keys.values())) == 20_002
    assert validation_reads <= 2 * 3  # once per class (Save Video's VALIDATE_INPUTS reads it once more)


# --------------------------------------------------------------------------- fail early
@pytest.mark.parametrize("prefix,message", [
    ("", "must end with a file name"), ("/tmp/elsewhere", "points outside the output folder"),
    ("../up", "points outside the output folder"), ("a/../../b", "points outside the output folder"),
    ("videos/", "must end with a file name"), (".", "must end with a file name"),
    ("x\u0000y", "file names cannot hold"), ("\ud800", "file names cannot hold"), ("a" * 250, "file systems allow 255"),
])
def test_bad_filename_prefixes_fail_validation_and_write_nothing(prefix, message, capsys, tmp_path):
    override = f"3.filename_prefix={json.dumps(prefix)}"
    for command in ("validate", "run"):
        code, text = _main([command, SHAPES, "--set", override] +
                           (["--output-dir", tmp_path / "o"] if command == "run" else []), capsys)
        assert code == 2 and "node 3 (KineFlowSaveVideo)" in text and message in text, text
    assert not _written(tmp_path / "o") and not (tmp_path / "o").exists()


@pytest.mark.parametrize("overrides,message", [
    (["7.tiling=\"enabled\"", "7.tile_size=64", "7.tile_overlap=40"], "tile_size must be positive and at least twice"),
    (["7.tiling=\"enabled\"", "7.tile_size=100"], "tile_size must be a non-negative multiple of 8"),
    (["7.tiling=\"enabled\"", "7.tile_frames=16", "7.frame_overlap=12"], "tile_frames must be positive and at least"),
    (["7.tile_size=-5"], "smaller than min"),
])
def test_vae_decode_tiles_are_checked_before_sampling(overrides, message, capsys):
    argv = ["validate", TEXT_TO_VIDEO]
    for override in overrides:
        argv += ["--set", override]
    code, text = _main(argv, capsys)
    assert code == 2 and "node 7 (KineFlowVAEDecode)" in text and message in text, text


def test_a_missing_llama_tokenizer_is_found_missing_before_the_transformer_loads(capsys, tmp_path):
    code, text = _main(["validate", TEXT_TO_VIDEO, "--set", f"3.llm_tokenizer={json.dumps(str(tmp_path / 'none'))}"],
                       capsys)
    assert code == 2 and "node 3 (KineFlowLoadTextEncoders)" in text and "tokenizer file not found" in text, text


def test_context_overlap_not_below_length_is_refused(capsys, tmp_path):
    workflow = json.loads(TEXT_TO_VIDEO.read_text())
    workflow["9"] = {"class_type": "KineFlowContextOptions", "inputs": {
        "length": 4, "overlap": 4, "stride": 1, "schedule": "uniform", "fuse_method": "pyramid"}}
    workflow["6"]["inputs"]["context_options"] = ["9", 0]
    code, text = _main(["validate", _write(tmp_path, workflow)], capsys)
    assert code == 2 and "context overlap must be in [0, length=4), got 4" in text, text


def test_a_video_larger_than_the_memory_budget_is_refused_at_validation(capsys, tmp_path):
    big = ["--set", "5.width=8192", "--set", "5.height=8192", "--set", "5.frames=1025", "--set", "5.batch_size=64"]
    code, text = _main(["validate", TEXT_TO_VIDEO, *big], capsys)
    assert code == 2 and "node 5 (KineFlowEmptyVideoLatent)" in text, text
    assert "need 50228.00 GiB" in text and "--memory-budget" in text, text
    small_budget = ["--memory-budget", "0.001"]  # the workflow's 128x128x9 needs 1.7 MiB
    code, text = _main(["validate", TEXT_TO_VIDEO, *small_budget], capsys)
    assert code == 2 and "need 1.7 MiB" in text and "memory budget of 1.0 MiB" in text, text
    code, text = _main(["run", TEXT_TO_VIDEO, *small_budget, "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "need 1.7 MiB" in text and not _written(tmp_path / "o"), text
    code, text = _main(["validate", TEXT_TO_VIDEO, "--memory-budget", "0.01"], capsys)
    assert code == 0, text
