"""Hangs and memory: symlink loops in model folders, and files whose contents would not fit the memory budget, are
refused with an exit-2 message before anything big is allocated."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import av
import pytest
import torch

from kineflow.errors import InputFileError
from kineflow.runtime import cli, host, media


# --------------------------------------------------------------------------- symlink loops
def test_model_folders_with_symlink_loops_are_listed_without_hanging(tmp_path):
    models = tmp_path / "models"
    folder = models / "diffusion_models"
    (folder / "sub").mkdir(parents=True)
    (folder / "mine.safetensors").write_bytes(b"")
    (folder / "sub" / "deep.safetensors").write_bytes(b"")
    (folder / "loop").symlink_to(folder)  # a link to itself
    (folder / "sub" / "up").symlink_to(models)  # a link to an ancestor
    (folder / "self.safetensors").symlink_to(folder / "self.safetensors")  # a link that never resolves
    script = ("import json, sys; from kineflow.runtime import host; host.configure(models_dir=sys.argv[1]); "
              "print(json.dumps([host.list_models('diffusion_models'), host.missing_model('diffusion_models', 'x')]))")
    done = subprocess.run([sys.executable, "-c", script, str(models)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed, missing = json.loads(done.stdout)
    assert {"mine.safetensors", "sub/deep.safetensors"} <= set(listed)
    assert not [name for name in listed if name.startswith(("loop/", "sub/up/"))], listed  # each folder once
    assert "not found" in missing and "mine.safetensors" in missing


def test_kineflow_nodes_answers_with_a_looping_models_folder(tmp_path):
    folder = tmp_path / "models" / "vae"
    folder.mkdir(parents=True)
    (folder / "a").symlink_to(folder)
    (folder / "b").symlink_to(folder)
    main = "import sys; from kineflow.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", main, "nodes"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KINEFLOW_MODELS": str(tmp_path / "models")})
    assert done.returncode == 0 and "KineFlowLoadVideoVAE" in done.stdout, done.stderr


# --------------------------------------------------------------------------- Load Video
def _load_video_workflow(tmp_path: Path, video: str) -> Path:
    path = tmp_path / "load_video.json"
    path.write_text(json.dumps({
        "1": {"class_type": "KineFlowLoadVideo", "inputs": {
            "video": video, "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1, "force_rate": 0.0,
            "custom_width": 0, "custom_height": 0}},
        "2": {"class_type": "KineFlowSaveVideo", "inputs": {
            "images": ["1", 0], "frame_rate": 8.0, "filename_prefix": "out", "format": "mp4", "quality": 80,
            "loop_count": 0, "save_metadata": False}},
    }))
    return path


def _tiny_file_of_huge_frames(path: Path) -> None:
    """A few kB that announce 64 frames of 4096x4096 (12 GiB as float32 RGB): two black frames 63 frames apart."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width = stream.height = 4096
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "51"}
        frame = av.VideoFrame(4096, 4096, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for pts in (0, 63):
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def test_a_video_whose_frames_exceed_the_memory_budget_is_refused_from_its_stream_info(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "input"
    inputs.mkdir()
    _tiny_file_of_huge_frames(inputs / "huge.mkv")
    assert (inputs / "huge.mkv").stat().st_size < 100_000
    monkeypatch.setattr(media, "_to_float", lambda array: pytest.fail("a frame was decoded"))
    code = cli.main(["run", str(_load_video_workflow(tmp_path, "huge.mkv")), "--input-dir", str(inputs),
                     "--output-dir", str(tmp_path / "output"), "--memory-budget", "4"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "refused to load huge.mkv: the memory budget of 4.00 GiB does not hold 64 frames of 4096x4096" in err
    assert "--memory-budget" in err and "Traceback" not in err


def test_a_video_with_more_frames_than_its_header_says_stops_at_the_budget(tmp_path, monkeypatch):
    path = media.write_video(torch.full((8, 64, 64, 3), 0.5), tmp_path / "clip.mp4", fps=8.0)
    probe = media._probe_av

    def lying_probe(p):
        container, stream, info = probe(p)
        return container, stream, {**info, "frame_count": 1, "duration": 0.125}

    monkeypatch.setattr(media, "_probe_av", lying_probe)
    frame_bytes = 64 * 64 * media.PIXEL_BYTES
    with host.configured(memory_budget=5 * frame_bytes / 2**30):  # the source frame and four decoded ones
        with pytest.raises(InputFileError, match="does not hold more than 4 frames of 64x64"):
            media.read_video(path)
        assert media.read_video(path, frame_cap=4)[0].shape[0] == 4


# --------------------------------------------------------------------------- Load Image
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels and holds almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


def _load_image_workflow(tmp_path: Path, image: str) -> Path:
    path = tmp_path / "load_image.json"
    path.write_text(json.dumps({
        "1": {"class_type": "KineFlowLoadImage", "inputs": {"image": image}},
        "2": {"class_type": "KineFlowSaveVideo", "inputs": {
            "images": ["1", 0], "frame_rate": 8.0, "filename_prefix": "out", "format": "mp4", "quality": 80,
            "loop_count": 0, "save_metadata": False}},
    }))
    return path


def test_an_image_over_pillows_decompression_bomb_limit_is_exit_2(tmp_path, capsys):
    inputs = tmp_path / "input"
    inputs.mkdir()
    _png_header_only(inputs / "bomb.png", 100_000, 100_000)
    code = cli.main(["run", str(_load_image_workflow(tmp_path, "bomb.png")), "--input-dir", str(inputs),
                     "--output-dir", str(tmp_path / "output")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "refused to read" in err and "decompression bomb" in err and "Traceback" not in err


def test_an_image_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    _png_header_only(tmp_path / "wide.png", 4000, 4000)  # under Pillow's limit: 183 MiB as float32 RGB
    with host.configured(memory_budget=0.1), pytest.raises(InputFileError, match="does not hold an image of 4000x4000"):
        media.read_image(tmp_path / "wide.png")


# --------------------------------------------------------------------------- legacy pickles
def test_a_legacy_pickle_larger_than_the_budget_is_refused_with_a_way_out(tmp_path, capsys, monkeypatch):
    weights = {"w": torch.zeros(64, 1024)}  # 256 KiB
    torch.save(weights, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(weights, tmp_path / "zipped.pt")
    monkeypatch.setenv("KINEFLOW_MEMORY_BUDGET", str(128 / 2**20))  # 128 KiB
    assert cli.main(["inspect", str(tmp_path / "legacy.pt")]) == 2
    err = capsys.readouterr().err
    assert "legacy (non-zip) PyTorch pickle" in err and "Convert it to .safetensors" in err and "Traceback" not in err
    assert cli.main(["inspect", str(tmp_path / "zipped.pt")]) == 0  # read lazily (mmap): no whole read to refuse
    monkeypatch.delenv("KINEFLOW_MEMORY_BUDGET")
    assert cli.main(["inspect", str(tmp_path / "legacy.pt")]) == 0
