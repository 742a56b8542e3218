"""Damaged and hostile model files: a clear exit-2 message, never a hang, never a read of data that is refused."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kineflow.errors import ModelFileError
from kineflow.models import checkpoints
from kineflow.runtime import cli, host
from kineflow.runtime.video_models import load_video_model

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def _safetensors(path: Path, header, data: bytes = b"") -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "negative offset": {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
    "shape as strings": {"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}},
    "negative shape": {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    "shape 1e400": b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}',
    "metadata not an object": {"__metadata__": ["x"], "w": GOOD},
    "entry not an object": {"w": [1, 2]},
    "dtype a number": {"w": {"dtype": 7, "shape": [2], "data_offsets": [0, 8]}},
    "offsets a string": {"w": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}},
    "offsets of three": {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}},
    "deep nesting": b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge shape": {"w": {"dtype": "F32", "shape": [10 ** 30, 10 ** 30], "data_offsets": [0, 8]}},
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_safetensors_headers_are_exit_2(case, tmp_path, capsys):
    path = _safetensors(tmp_path / "bad.safetensors", BAD_HEADERS[case], b"\0" * 8)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'bad.safetensors' is not a valid safetensors file" in err and "Traceback" not in err


def test_a_fifo_named_like_a_checkpoint_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    main = "import sys; from kineflow.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", main, "inspect", str(fifo)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "is not a regular file" in done.stderr
    with pytest.raises(ModelFileError, match="not a regular file"):
        checkpoints.read_header(fifo)


def test_a_transformer_with_an_extra_tensor_is_refused_before_any_data_is_read(tmp_path, monkeypatch):
    """The extra 1 GiB tensor is a hole in a sparse file: reading it would take a GiB of memory."""
    shipped = WEIGHTS / "diffusion_models" / "kineflow_tiny_dit.safetensors"
    header = checkpoints.read_header(shipped)
    entries, offset = {}, 0
    for name, info in header.tensors.items():
        size = info.numel * 4
        entries[name] = {"dtype": "F32", "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    entries["extra.weight"] = {"dtype": "F32", "shape": [1 << 28], "data_offsets": [offset, offset + (1 << 30)]}
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    path = _safetensors(folder / "extra.safetensors", entries)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + offset + (1 << 30))
    reads = []
    real_load = checkpoints.load_tensors
    monkeypatch.setattr(checkpoints, "load_tensors", lambda h, **kw: reads.append(kw.get("device")) or real_load(h, **kw))
    with host.configured(models_dir=tmp_path), pytest.raises(ModelFileError, match=r"1 unexpected \(e.g. \['extra.weight'\]\)"):
        load_video_model("extra.safetensors", offload="full")
    assert all(device == "meta" for device in reads)


@pytest.mark.parametrize("config", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '{"num_attention_heads": "four"}',
                                    '{"rope_theta": NaN}'])
def test_a_damaged_config_json_of_a_text_encoder_folder_is_exit_2(config, tmp_path, capsys):
    folder = tmp_path / "text_encoders" / "llm"
    folder.mkdir(parents=True)
    source = WEIGHTS / "text_encoders" / "kineflow_tiny_llm"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "config.json").write_text(config)
    code = cli.main(["run", "workflows/api/text_to_video.json", "--models-dir", str(tmp_path), "--output-dir",
                     str(tmp_path / "out"), "--set", '3.llm_name="llm"'])
    err = capsys.readouterr().err
    assert code == 2 and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pickles_are_refused_on_a_torch_with_known_weights_only_bypasses(tmp_path, monkeypatch):
    import torch

    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert "w" in checkpoints.read_header(path).tensors
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    with pytest.raises(ModelFileError, match=r"'model.pt'.*PyTorch \(2.9.1\+cu128\).*fixed in 2.10"):
        checkpoints.read_header(path)
    _safetensors(tmp_path / "model.safetensors", {"w": GOOD}, b"\0" * 8)
    assert "w" in checkpoints.read_header(tmp_path / "model.safetensors").tensors  # safetensors need no such care
