"""Save Video / Load Video / Load Image nodes and the frame utility nodes, run as ComfyUI would call them."""

import json
import os

import av
import pytest
import torch
from PIL import Image

import kineflow
from kineflow.nodes.frames import (
    KineFlowConcatenateFrames,
    KineFlowEveryNthFrame,
    KineFlowFrameInfo,
    KineFlowResizeFrames,
    KineFlowSelectFrames,
)
from kineflow.nodes.video_io import KineFlowLoadImage, KineFlowLoadVideo, KineFlowSaveVideo
from kineflow.runtime import host, media
from kineflow.errors import InputFileError, InterruptedRun, KineFlowError

PROMPT = {"1": {"class_type": "KineFlowSaveVideo", "inputs": {"frame_rate": 8.0}}}
EXTRA = {"workflow": {"nodes": [{"id": 1, "type": "KineFlowSaveVideo"}], "links": []}}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """Fresh output/input folders; the host's standalone settings are restored afterwards."""
    monkeypatch.setattr(host._Standalone, "output_dir", host._Standalone.output_dir)
    monkeypatch.setattr(host._Standalone, "input_dir", host._Standalone.input_dir)
    out, inp = tmp_path / "output", tmp_path / "input"
    inp.mkdir()
    host.configure(output_dir=out, input_dir=inp)
    host.clear_interrupt()
    yield out, inp
    host.clear_interrupt()


def clip(frames=6, height=16, width=24):
    levels = torch.arange(frames, dtype=torch.float32) / (frames - 1)
    ramp = torch.linspace(0.2, 0.8, width)[None, None, :, None]
    return (0.5 * levels[:, None, None, None] + 0.5 * ramp).expand(frames, height, width, 3).contiguous()


def save(fmt, images=None, **overrides):
    args = dict(images=clip() if images is None else images, frame_rate=8.0, filename_prefix="KineFlow", format=fmt,
                quality=85, loop_count=0, save_metadata=True, prompt=PROMPT, extra_pnginfo=EXTRA)
    args.update(overrides)
    return KineFlowSaveVideo().save(**args)


def test_nodes_are_registered_with_display_names():
    for name in ("KineFlowSaveVideo", "KineFlowLoadVideo", "KineFlowLoadImage", "KineFlowSelectFrames",
                 "KineFlowEveryNthFrame", "KineFlowConcatenateFrames", "KineFlowResizeFrames", "KineFlowFrameInfo"):
        assert name in kineflow.NODE_CLASS_MAPPINGS
        assert kineflow.NODE_CLASS_MAPPINGS[name].CATEGORY == "KineFlow/video"
    assert kineflow.NODE_DISPLAY_NAME_MAPPINGS["KineFlowSaveVideo"] == "Save Video (KineFlow)"


@pytest.mark.parametrize("fmt,animated", [("mp4", True), ("webm", True), ("gif", False), ("webp", True)])
def test_save_video_writes_file_and_reports_it_for_the_canvas(folders, fmt, animated):
    out, _ = folders
    result = save(fmt)
    entry = result["ui"]["images"][0]
    assert entry == {"filename": f"KineFlow_00001_.{fmt}", "subfolder": "", "type": "output", "format": media.MIME_TYPES[fmt]}
    assert result["ui"]["animated"] == (animated,)
    assert result["result"] == (str(out / entry["filename"]),)
    frames, info = media.read_video(out / entry["filename"])
    assert frames.shape == (6, 16, 24, 3)
    assert info["fps"] == pytest.approx(8.0, rel=1e-3)
    assert (frames - clip()).abs().mean() < 0.03
    assert os.listdir(out) == [entry["filename"]]


def test_save_video_counts_up_and_uses_subfolders(folders):
    out, _ = folders
    names = [save("gif")["ui"]["images"][0]["filename"] for _ in range(2)]
    names.append(save("mp4")["ui"]["images"][0]["filename"])
    assert names == ["KineFlow_00001_.gif", "KineFlow_00002_.gif", "KineFlow_00003_.mp4"]
    entry = save("webm", filename_prefix="runs/test")["ui"]["images"][0]
    assert (entry["subfolder"], entry["filename"]) == ("runs", "test_00001_.webm")
    assert (out / "runs" / "test_00001_.webm").is_file()
    with pytest.raises(KineFlowError, match="outside the output folder"):
        save("mp4", filename_prefix="../escape")


def test_save_video_embeds_prompt_and_workflow_only_when_asked(folders):
    out, _ = folders
    name = save("mp4")["ui"]["images"][0]["filename"]
    with av.open(str(out / name)) as container:
        assert json.loads(container.metadata["prompt"]) == PROMPT
        assert json.loads(container.metadata["workflow"]) == EXTRA["workflow"]
    name = save("mp4", save_metadata=False)["ui"]["images"][0]["filename"]
    with av.open(str(out / name)) as container:
        assert "prompt" not in container.metadata and "workflow" not in container.metadata
    name = save("webp")["ui"]["images"][0]["filename"]
    with Image.open(out / name) as image:
        assert image.getexif()[0x010F] == "workflow:" + json.dumps(EXTRA["workflow"])


def test_save_video_gif_and_webp_loop_count(folders):
    out, _ = folders
    name = save("webp", loop_count=2)["ui"]["images"][0]["filename"]
    with Image.open(out / name) as image:
        assert image.info["loop"] == 2


@pytest.mark.parametrize("fmt", ["mp4", "webp"])
def test_cancelled_save_leaves_nothing_in_the_output_folder(folders, monkeypatch, fmt):
    out, _ = folders
    calls = []

    def cancel_on_third_frame():
        calls.append(1)
        if len(calls) == 3:
            host.request_interrupt()
        if host._Standalone.interrupt.is_set():
            raise InterruptedRun("interrupted by the user")

    monkeypatch.setattr(host, "check_interrupt", cancel_on_third_frame)
    with pytest.raises(InterruptedRun):
        save(fmt)
    assert len(calls) == 3
    assert list(out.rglob("*")) == []


# --------------------------------------------------------------------------- Load Video / Load Image
def load_args(**overrides):
    args = dict(video="", frame_load_cap=0, skip_first_frames=0, select_every_nth=1, force_rate=0.0, custom_width=0, custom_height=0)
    args.update(overrides)
    return args


def test_load_video_lists_input_files_and_applies_options(folders):
    _, inp = folders
    media.write_video(clip(frames=8), inp / "walk.webm", fps=8.0)
    (inp / "notes.txt").write_text("not listed")
    choices = KineFlowLoadVideo.INPUT_TYPES()["required"]["video"][0]
    assert choices == ["walk.webm"]
    node = KineFlowLoadVideo()
    images, count, fps = node.load(**load_args(video="walk.webm"))
    assert images.shape == (8, 16, 24, 3) and count == 8 and fps == pytest.approx(8.0)
    images, count, fps = node.load(**load_args(video="walk.webm", skip_first_frames=1, select_every_nth=2, frame_load_cap=3))
    assert count == 3 and fps == pytest.approx(4.0)
    assert torch.allclose(images.mean(dim=(1, 2, 3)), clip(frames=8)[[1, 3, 5]].mean(dim=(1, 2, 3)), atol=0.02)
    images, count, fps = node.load(**load_args(video="walk.webm", force_rate=4.0, custom_width=12))
    assert images.shape == (4, 8, 12, 3) and fps == pytest.approx(4.0)


def test_load_video_path_overrides_the_choice(folders):
    _, inp = folders
    media.write_video(clip(frames=3), inp / "clips" / "other.mp4", fps=6.0)
    images, count, fps = KineFlowLoadVideo().load(**load_args(video="missing.mp4", video_path="clips/other.mp4"))
    assert count == 3 and fps == pytest.approx(6.0)
    assert KineFlowLoadVideo.VALIDATE_INPUTS(video="missing.mp4", video_path="clips/other.mp4") is True


def test_load_video_validation_and_clear_errors(folders):
    _, inp = folders
    message = KineFlowLoadVideo.VALIDATE_INPUTS(video="missing.mp4", video_path="")
    assert "video file not found" in message and "missing.mp4" in message
    assert "no video chosen" in KineFlowLoadVideo.VALIDATE_INPUTS(video="", video_path="")
    (inp / "fake.mp4").write_text("plain text, not a video")
    assert KineFlowLoadVideo.VALIDATE_INPUTS(video="fake.mp4") is True  # exists; content is checked on load
    with pytest.raises(InputFileError, match="fake.mp4 as a video"):
        KineFlowLoadVideo().load(**load_args(video="fake.mp4"))
    with pytest.raises(InputFileError, match="not found"):
        KineFlowLoadVideo().load(**load_args(video="missing.mp4"))


def test_load_video_is_changed_follows_the_file_mtime(folders):
    _, inp = folders
    path = media.write_video(clip(frames=2), inp / "a.webm", fps=4.0)
    first = KineFlowLoadVideo.IS_CHANGED(video="a.webm", video_path="", frame_load_cap=0)
    assert first == KineFlowLoadVideo.IS_CHANGED(video="a.webm", video_path="")
    os.utime(path, (path.stat().st_atime, path.stat().st_mtime + 10))
    assert KineFlowLoadVideo.IS_CHANGED(video="a.webm", video_path="") != first


def test_load_image_returns_image_and_mask(folders):
    _, inp = folders
    rgba = Image.new("RGBA", (5, 4), (0, 255, 0, 255))
    rgba.putpixel((0, 0), (0, 255, 0, 0))
    rgba.save(inp / "dot.png")
    assert KineFlowLoadImage.INPUT_TYPES()["required"]["image"][0] == ["dot.png"]
    image, mask = KineFlowLoadImage().load(image="dot.png")
    assert image.shape == (1, 4, 5, 3) and torch.all(image[..., 1] == 1)
    assert mask.shape == (1, 4, 5) and mask.sum() == 1 and mask[0, 0, 0] == 1
    assert "image file not found" in KineFlowLoadImage.VALIDATE_INPUTS(image="nope.png")


# --------------------------------------------------------------------------- frame utility nodes
def test_frame_utility_nodes():
    frames = torch.arange(6, dtype=torch.float32)[:, None, None, None].expand(6, 4, 8, 3) / 5

    def ids(x):
        return [round(v) for v in (x[:, 0, 0, 0] * 5).tolist()]

    assert ids(KineFlowSelectFrames().select(frames, 1, 3)[0]) == [1, 2, 3]
    assert ids(KineFlowEveryNthFrame().thin(frames, 2, 1)[0]) == [1, 3, 5]
    assert ids(KineFlowConcatenateFrames().concat(frames[:2], frames[4:], "disabled")[0]) == [0, 1, 4, 5]
    with pytest.raises(KineFlowError, match="different sizes"):
        KineFlowConcatenateFrames().concat(frames, frames[:, :2], "disabled")
    joined = KineFlowConcatenateFrames().concat(frames, frames[:2, :2, :4], "bilinear")[0]
    assert joined.shape == (8, 4, 8, 3) and ids(joined[6:]) == [0, 1]
    resized = KineFlowResizeFrames().resize(frames, 4, 0, "area", "disabled")[0]
    assert resized.shape == (6, 2, 4, 3) and ids(resized) == list(range(6))
    assert KineFlowFrameInfo().info(frames) == (6, 8, 4)
