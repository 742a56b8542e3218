"""runtime/media.py: atomic files, output naming, encoding/decoding round trips, metadata, frame operations."""

import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from kineflow.runtime import host, media
from kineflow.errors import InputFileError, InterruptedRun, KineFlowError


def gradient_clip(frames=8, height=24, width=32):
    """A smooth moving gradient: easy for every codec, so errors measure the pipeline, not the codec."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    clip = [torch.stack([0.1 + 0.8 * y, 0.1 + 0.8 * x, 0.2 + 0.6 * ((x + y) / 2 + i / (4 * frames))], -1) for i in range(frames)]
    return torch.stack(clip)


def numbered_clip(frames=12, height=16, width=16):
    """Frame i is a flat grey of level i/(frames-1): the decoded brightness tells which frame it was."""
    levels = torch.arange(frames, dtype=torch.float32) / (frames - 1)
    return levels[:, None, None, None].expand(frames, height, width, 3).contiguous()


def frame_numbers(decoded, frames=12):
    return [round(v) for v in (decoded.mean(dim=(1, 2, 3)) * (frames - 1)).tolist()]


@pytest.fixture(autouse=True)
def no_pending_interrupt():
    host.clear_interrupt()
    yield
    host.clear_interrupt()


# --------------------------------------------------------------------------- atomic_write / naming
def test_atomic_write_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with media.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".bin" and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, InterruptedRun, ValueError])
def test_atomic_write_failure_removes_temp_and_keeps_old_file(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with media.atomic_write(target) as tmp:
            tmp.write_bytes(b"partial")
            raise error("stop")
    assert os.listdir(tmp_path) == ["out.bin"]
    assert target.read_bytes() == b"old"


def test_next_output_path_counts_like_comfyui(tmp_path):
    path, subfolder, name = media.next_output_path(tmp_path, "KineFlow", "mp4")
    assert (path, subfolder, name) == (tmp_path / "KineFlow_00001_.mp4", "", "KineFlow_00001_.mp4")
    (tmp_path / "KineFlow_00001_.mp4").touch()
    (tmp_path / "KineFlow_00007_.webm").touch()  # the counter is shared by all extensions
    (tmp_path / "KineFlowOther_00050_.mp4").touch()  # another prefix
    (tmp_path / "KineFlow_notes.txt").touch()
    assert media.next_output_path(tmp_path, "KineFlow", ".gif")[2] == "KineFlow_00008_.gif"


def test_next_output_path_subfolder_and_escape(tmp_path):
    path, subfolder, name = media.next_output_path(tmp_path, "videos/run", "webp")
    assert subfolder == "videos" and name == "run_00001_.webp" and path == tmp_path / "videos" / name
    assert path.parent.is_dir()
    for bad in ("../outside", "videos/../../outside", "/etc/outside"):
        with pytest.raises(KineFlowError, match="outside the output folder"):
            media.next_output_path(tmp_path, bad, "mp4")
    with pytest.raises(KineFlowError, match="must end with a file name"):
        media.next_output_path(tmp_path, "videos/", "mp4")


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "fmt,max_error",
    [("mp4", 0.03), ("webm", 0.03), ("gif", 0.04), ("webp", 0.03)],
)
def test_write_then_read_back_preserves_count_size_rate_and_pixels(tmp_path, fmt, max_error):
    clip = gradient_clip()
    path = media.write_video(clip, tmp_path / f"clip.{fmt}", fps=10.0, quality=90)
    decoded, info = media.read_video(path)
    assert decoded.shape == clip.shape and decoded.dtype == torch.float32
    assert (info["frame_count"], info["width"], info["height"]) == (8, 32, 24)
    assert info["fps"] == pytest.approx(10.0, rel=1e-3)
    assert info["duration"] == pytest.approx(0.8, abs=0.02)
    error = (decoded - clip).abs().mean().item()
    assert error < max_error, f"{fmt}: mean abs error {error:.4f}"
    assert os.listdir(tmp_path) == [f"clip.{fmt}"]


def test_independent_decoders_agree_on_frame_count_and_rate(tmp_path):
    """Files are checked with the decoders players use, not only with our own reader."""
    clip = gradient_clip(frames=6)
    for fmt in ("mp4", "webm"):
        path = media.write_video(clip, tmp_path / f"c.{fmt}", fps=12.0)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert float(stream.average_rate) == pytest.approx(12.0)
            assert sum(1 for _ in container.decode(stream)) == 6
    for fmt in ("gif", "webp"):
        path = media.write_video(clip, tmp_path / f"c.{fmt}", fps=12.0)
        with Image.open(path) as image:
            assert image.n_frames == 6 and image.size == (32, 24)


def test_mp4_pads_odd_sizes_by_one_edge_pixel_and_webm_keeps_them(tmp_path):
    clip = gradient_clip(frames=3, height=23, width=31)
    mp4, _ = media.read_video(media.write_video(clip, tmp_path / "odd.mp4", fps=8.0, quality=95))
    assert mp4.shape == (3, 24, 32, 3)
    assert (mp4[:, :23, :31] - clip).abs().mean() < 0.03
    assert (mp4[:, 23, :31] - clip[:, 22]).abs().mean() < 0.05  # padded row repeats the edge
    webm, _ = media.read_video(media.write_video(clip, tmp_path / "odd.webm", fps=8.0))
    assert webm.shape == clip.shape


def test_fractional_rate_survives_in_mp4(tmp_path):
    path = media.write_video(gradient_clip(frames=4), tmp_path / "ntsc.mp4", fps=23.976)
    assert media.read_video(path)[1]["fps"] == pytest.approx(23.976, abs=1e-3)


def test_gif_rate_is_rounded_to_centiseconds_without_drift(tmp_path):
    path = media.write_video(gradient_clip(frames=24), tmp_path / "c.gif", fps=24.0)
    with Image.open(path) as image:
        durations = []
        for i in range(image.n_frames):
            image.seek(i)
            durations.append(image.info["duration"])
    assert set(durations) == {40, 50} and sum(durations) == 1000


@pytest.mark.parametrize("loop,expected", [(0, 0), (1, None), (3, 2)])
def test_gif_loop_count_means_number_of_plays(tmp_path, loop, expected):
    path = media.write_video(gradient_clip(frames=2), tmp_path / "c.gif", fps=5.0, loop=loop)
    with Image.open(path) as image:
        assert image.info.get("loop") == expected


def test_webp_loop_quality_and_lossless(tmp_path):
    clip = gradient_clip(frames=3)
    lossy = media.write_video(clip, tmp_path / "lossy.webp", fps=5.0, quality=50, loop=3)
    lossless = media.write_video(clip, tmp_path / "lossless.webp", fps=5.0, quality=100)
    with Image.open(lossy) as image:
        assert image.info["loop"] == 3
    exact = torch.from_numpy(media._to_uint8(clip[0])).float() / 255
    assert torch.equal(media.read_video(lossless)[0][0], exact)
    assert lossy.stat().st_size < lossless.stat().st_size


def test_invalid_write_arguments_are_explained(tmp_path):
    with pytest.raises(KineFlowError, match="must be one of"):
        media.write_video(gradient_clip(2), tmp_path / "c.avi", fps=5.0)
    with pytest.raises(KineFlowError, match=r"\[frames, height, width, 3\]"):
        media.write_video(torch.zeros(2, 8, 8), tmp_path / "c.mp4", fps=5.0)
    with pytest.raises(KineFlowError, match="positive"):
        media.write_video(gradient_clip(2), tmp_path / "c.mp4", fps=0.0)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- metadata
PROMPT = {"3": {"class_type": "KineFlowSaveVideo", "inputs": {"frame_rate": 24}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "KineFlowSaveVideo"}], "links": []}


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_container_metadata_holds_prompt_and_workflow_json(tmp_path, fmt):
    path = media.write_video(gradient_clip(2), tmp_path / f"m.{fmt}", fps=5.0, metadata={"prompt": PROMPT, "workflow": WORKFLOW})
    with av.open(str(path)) as container:
        tags = {k.lower(): v for k, v in container.metadata.items()}  # the matroska muxer upper-cases names
    assert json.loads(tags["prompt"]) == PROMPT
    assert json.loads(tags["workflow"]) == WORKFLOW


def test_webp_exif_metadata_uses_comfyui_layout(tmp_path):
    path = media.write_video(gradient_clip(2), tmp_path / "m.webp", fps=5.0, metadata={"prompt": PROMPT, "workflow": WORKFLOW})
    with Image.open(path) as image:
        exif = image.getexif()
    key, _, value = exif[0x0110].partition(":")
    assert key == "prompt" and json.loads(value) == PROMPT
    key, _, value = exif[0x010F].partition(":")
    assert key == "workflow" and json.loads(value) == WORKFLOW


def test_png_text_chunks_round_trip_with_read_image(tmp_path):
    image = gradient_clip(1)
    path = media.write_png(image, tmp_path / "still.png", metadata={"prompt": PROMPT, "workflow": WORKFLOW})
    with Image.open(path) as png:
        assert json.loads(png.text["prompt"]) == PROMPT and json.loads(png.text["workflow"]) == WORKFLOW
    loaded, mask = media.read_image(path)
    assert loaded.shape == (1, 24, 32, 3) and mask.shape == (1, 24, 32)
    assert (loaded - image).abs().max() <= 0.5 / 255 + 1e-6
    assert mask.abs().max() == 0


# --------------------------------------------------------------------------- interruption
class InterruptAfter:
    """Replaces the per-frame interrupt check with one that raises `error` on its `fail_at`-th call."""

    def __init__(self, monkeypatch, error, fail_at=3):
        self.calls = 0

        def check():
            self.calls += 1
            if self.calls >= fail_at:
                raise error("stop requested mid-way")

        monkeypatch.setattr(host, "check_interrupt", check)


@pytest.mark.parametrize("fmt", media.VIDEO_FORMATS)
@pytest.mark.parametrize("error", [InterruptedRun, KeyboardInterrupt])
def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch, fmt, error):
    failing = InterruptAfter(monkeypatch, error)
    with pytest.raises(error):
        media.write_video(gradient_clip(6), tmp_path / f"x.{fmt}", fps=5.0)
    assert failing.calls == 3
    assert os.listdir(tmp_path) == []


def test_encoder_failure_mid_way_leaves_nothing(tmp_path, monkeypatch):
    real = media._to_uint8
    seen = []

    def flaky(frame):
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(frame)

    monkeypatch.setattr(media, "_to_uint8", flaky)
    with pytest.raises(KeyboardInterrupt):
        media.write_video(gradient_clip(6), tmp_path / "x.mp4", fps=5.0)
    assert os.listdir(tmp_path) == []


def test_requested_interrupt_stops_save_and_load(tmp_path):
    path = media.write_video(numbered_clip(), tmp_path / "n.mp4", fps=12.0)
    host.request_interrupt()
    with pytest.raises(InterruptedRun):
        media.write_video(gradient_clip(4), tmp_path / "y.mp4", fps=5.0)
    with pytest.raises(InterruptedRun):
        media.read_video(path)
    assert os.listdir(tmp_path) == ["n.mp4"]


# --------------------------------------------------------------------------- read options
@pytest.fixture(scope="module")
def numbered_mp4(tmp_path_factory):
    return media.write_video(numbered_clip(), tmp_path_factory.mktemp("clips") / "numbered.mp4", fps=12.0, quality=100)


@pytest.mark.parametrize(
    "options,expected,loaded_fps",
    [
        ({}, list(range(12)), 12.0),
        ({"frame_cap": 5}, [0, 1, 2, 3, 4], 12.0),
        ({"skip_first": 7}, [7, 8, 9, 10, 11], 12.0),
        ({"select_every_nth": 3}, [0, 3, 6, 9], 4.0),
        ({"skip_first": 1, "select_every_nth": 4, "frame_cap": 2}, [1, 5], 3.0),
        ({"force_rate": 6.0}, [0, 2, 4, 6, 8, 10], 6.0),
        ({"force_rate": 24.0, "frame_cap": 6}, [0, 0, 1, 1, 2, 2], 24.0),
        ({"force_rate": 8.0}, [0, 1, 3, 4, 6, 7, 9, 10], 8.0),
        ({"force_rate": 6.0, "skip_first": 2, "select_every_nth": 2}, [4, 8], 3.0),
    ],
)
def test_read_video_options(numbered_mp4, options, expected, loaded_fps):
    frames, info = media.read_video(numbered_mp4, **options)
    assert frame_numbers(frames) == expected
    assert info["loaded_frames"] == len(expected)
    assert info["loaded_fps"] == pytest.approx(loaded_fps)


def test_force_rate_tolerates_millisecond_timestamps(tmp_path):
    """webm stores times in whole milliseconds (1/24 s -> 42 ms); that must not duplicate or drop frames."""
    path = media.write_video(numbered_clip(), tmp_path / "n.webm", fps=24.0, quality=100)
    assert frame_numbers(media.read_video(path, force_rate=24.0)[0]) == list(range(12))
    assert frame_numbers(media.read_video(path, force_rate=12.0)[0]) == [0, 2, 4, 6, 8, 10]


def test_read_video_stops_decoding_at_the_cap(numbered_mp4, monkeypatch):
    converted = []
    real = media._LazyFrame.rgb
    monkeypatch.setattr(media._LazyFrame, "rgb", lambda self: converted.append(1) or real(self))
    frames, _ = media.read_video(numbered_mp4, skip_first=2, select_every_nth=2, frame_cap=3)
    assert frame_numbers(frames) == [2, 4, 6] and len(converted) == 3


def test_read_video_resize(tmp_path):
    path = media.write_video(gradient_clip(frames=3, height=24, width=32), tmp_path / "g.webm", fps=5.0)
    assert media.read_video(path, size=(16, 0))[0].shape == (3, 12, 16, 3)
    assert media.read_video(path, size=(0, 12))[0].shape == (3, 12, 16, 3)
    assert media.read_video(path, size=(10, 10))[0].shape == (3, 10, 10, 3)


def test_read_video_nothing_left_is_explained(numbered_mp4):
    with pytest.raises(KineFlowError, match="no frames left"):
        media.read_video(numbered_mp4, skip_first=50)


# --------------------------------------------------------------------------- bad files
def test_bad_video_files_raise_input_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        media.read_video(tmp_path / "missing.mp4")
    (tmp_path / "notes.mp4").write_text("this is not a video")
    with pytest.raises(InputFileError, match="cannot read .*notes.mp4 as a video"):
        media.read_video(tmp_path / "notes.mp4")
    (tmp_path / "notes.gif").write_text("this is not a gif")
    with pytest.raises(InputFileError, match="notes.gif"):
        media.read_video(tmp_path / "notes.gif")
    with pytest.raises(InputFileError, match="is a folder"):
        media.read_video(tmp_path)


def test_bad_image_files_raise_input_file_errors(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        media.read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputFileError, match="cannot read .*notes.png as an image"):
        media.read_image(tmp_path / "notes.png")


def test_read_image_alpha_becomes_mask_and_16_bit_is_scaled(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :3, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image, mask = media.read_image(tmp_path / "a.png")
    assert image.shape == (1, 4, 6, 3) and torch.all(image[..., 0] == 1)
    assert torch.all(mask[0, :, :3] == 0) and torch.all(mask[0, :, 3:] == 1)
    Image.fromarray(np.full((3, 5), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    image, _ = media.read_image(tmp_path / "deep.png")
    assert image.shape == (1, 3, 5, 3) and image.mean().item() == pytest.approx(0.5, abs=1e-3)


# --------------------------------------------------------------------------- frame operations
@pytest.mark.parametrize("method", media.RESIZE_METHODS)
def test_resize_frames_methods_keep_range_and_content(method):
    clip = gradient_clip(frames=2, height=24, width=32)
    out = media.resize_frames(clip, 16, 12, method)
    assert out.shape == (2, 12, 16, 3) and out.dtype == clip.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert (out.mean() - clip.mean()).abs() < 0.02


def test_resize_frames_center_crop_and_aspect():
    clip = torch.zeros(1, 10, 20, 3)
    clip[:, :, 5:15] = 1.0  # the centre square is white, the sides black
    cropped = media.resize_frames(clip, 10, 10, "nearest", "center")
    assert cropped.shape == (1, 10, 10, 3) and torch.all(cropped == 1)
    stretched = media.resize_frames(clip, 10, 10, "nearest", "disabled")
    assert stretched.mean() == pytest.approx(0.5)
    assert media.resize_frames(clip, 0, 5, "area").shape == (1, 5, 10, 3)
    with pytest.raises(KineFlowError, match="resize method"):
        media.resize_frames(clip, 5, 5, "cubic")


def test_select_every_nth_and_concat():
    clip = numbered_clip(frames=10, height=2, width=2)
    assert frame_numbers(media.select_frames(clip, 2, 3), 10) == [2, 3, 4]
    assert frame_numbers(media.select_frames(clip, -2, 0), 10) == [8, 9]
    assert frame_numbers(media.select_frames(clip, 8, 5), 10) == [8, 9]
    with pytest.raises(KineFlowError, match="outside the clip of 10 frames"):
        media.select_frames(clip, 10, 1)
    assert frame_numbers(media.every_nth_frame(clip, 3, 1), 10) == [1, 4, 7]
    with pytest.raises(KineFlowError, match="offset 10"):
        media.every_nth_frame(clip, 2, 10)
    both = media.concat_frames(clip[:2], clip[5:7])
    assert frame_numbers(both, 10) == [0, 1, 5, 6]
    small = torch.zeros(3, 1, 1, 3)
    with pytest.raises(KineFlowError, match="frames_a is 2x2, frames_b is 1x1"):
        media.concat_frames(clip, small)
    assert media.concat_frames(clip, small, "nearest").shape == (13, 2, 2, 3)
