"""Video and image files: encoding, decoding and frame resizing (names and atomic writes: runtime/files.py).

Frames are ComfyUI IMAGE tensors: float `[F, H, W, 3]` in 0..1. Encoders: H.264 (libx264, shipped in PyAV's
wheels) for mp4, VP9 (libvpx-vp9) for webm, Pillow for gif and animated webp. Decoding uses PyAV, except
animated webp (FFmpeg's webp decoder cannot read animations) and gif, which go through Pillow so that their
per-frame durations are honoured.

Workflow metadata is embedded the way ComfyUI itself does it, so dragging a file onto the ComfyUI canvas
restores the workflow where the frontend supports the format (png, webp, mp4, webm; not gif):
mp4/webm container tags (`prompt`, `workflow`, ... as JSON strings; mp4 needs movflags=use_metadata_tags),
webp EXIF tags 0x0110 downwards holding "key:json", png tEXt chunks holding json.
"""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo

from . import host
from ..errors import InputFileError, KineFlowError
from .files import CROP_MODES, RESIZE_METHODS, VIDEO_FORMATS, atomic_write, next_output_path, release_claim

# Formats decoded with Pillow instead of PyAV (see module docstring).
_PILLOW_DECODED = (".gif", ".webp")
# Bytes per pixel of an IMAGE tensor (three float32 channels): what the frames read from a file take in memory.
PIXEL_BYTES = 3 * 4
# mime types for the "format" field of the UI result (informational; the frontend keys on the extension).
MIME_TYPES = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif", "webp": "image/webp", "png": "image/png"}


# --------------------------------------------------------------------------- tensors <-> arrays
def check_frames(frames: torch.Tensor, what: str = "frames") -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] not in (3, 4):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise KineFlowError(f"{what} must be an IMAGE tensor [frames, height, width, 3]; got {shape}.")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise KineFlowError(f"{what} is empty: shape {tuple(frames.shape)}.")
    return frames[..., :3]


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """One [H, W, 3] float frame in 0..1 to a contiguous uint8 array (rounded, clamped)."""
    return frame.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


def _to_float(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.require(array, requirements=("C", "W"))).float().div_(255.0)


# --------------------------------------------------------------------------- writing
def quality_to_crf(quality: int, fmt: str) -> int:
    """Map the 0..100 quality scale (higher is better) to libx264 CRF 51..0 (mp4) or libvpx-vp9 CRF 63..0 (webm)."""
    q = min(max(int(quality), 0), 100)
    if fmt == "mp4":
        return round(51 * (100 - q) / 100)
    if fmt == "webm":
        return round(63 * (100 - q) / 100)
    raise ValueError(f"CRF applies to mp4 and webm only, not {fmt!r}")


def write_video(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: float,
    format: str | None = None,
    quality: int = 80,
    loop: int = 0,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Encode frames [F, H, W, 3] (0..1) to `path` atomically; returns `path`.

    format: mp4 | webm | gif | webp (default: from the extension).
    quality: 0..100, higher is better. mp4: libx264 CRF = round(51*(100-q)/100) (80 -> 10; 100 is lossless
      and not playable everywhere); webm: VP9 CRF = round(63*(100-q)/100); webp: Pillow quality, 100 = lossless;
      gif ignores it (256-colour palette per frame).
    loop: how many times gif/webp play; 0 = forever. Ignored by mp4/webm.
    metadata: {key: JSON-able or str}, e.g. {"prompt": ..., "workflow": ...}; gif stores none.

    yuv420p needs even sizes for H.264: odd widths/heights are padded by one row/column repeating the edge
    pixels, so an mp4 of a 63x47 clip decodes as 64x48. VP9, gif and webp keep the exact size.
    Interruption is checked after every frame.
    """
    frames = check_frames(frames)
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in VIDEO_FORMATS:
        raise KineFlowError(f"video format must be one of {', '.join(VIDEO_FORMATS)}; got {fmt!r}.")
    if not (fps > 0):
        raise KineFlowError(f"frame rate must be positive; got {fps}.")
    if loop < 0:
        raise KineFlowError(f"loop count must be 0 (forever) or positive; got {loop}.")
    with atomic_write(path) as tmp:
        if fmt in ("mp4", "webm"):
            _write_av(frames, tmp, fps, fmt, quality, metadata)
        else:
            _write_pillow_animation(frames, tmp, fps, fmt, quality, loop, metadata)
    return path


def save_video(frames: torch.Tensor, output_dir: str | os.PathLike, filename_prefix: str, fmt: str, fps: float,
               quality: int = 80, loop: int = 0, metadata: dict[str, Any] | None = None) -> tuple[Path, dict]:
    """Save Video's work: encode `frames` to the next free output name; returns (path, the UI result entry).

    The name is claimed before encoding, so concurrent runs saving with the same prefix never write the same file.
    In a dry run (`meta` frames: shapes without data) the name is chosen and reported, and nothing is written."""
    dry_run = frames.is_meta
    path, subfolder, filename = next_output_path(output_dir, filename_prefix, fmt, claim=not dry_run)
    if dry_run:
        check_frames(frames)
        return path, {"filename": filename, "subfolder": subfolder, "type": "dry_run", "format": MIME_TYPES[fmt]}
    try:
        write_video(frames, path, fps, fmt, quality, loop, metadata)
    finally:
        release_claim(path)
    return path, {"filename": filename, "subfolder": subfolder, "type": "output", "format": MIME_TYPES[fmt]}


def _write_av(frames: torch.Tensor, path: Path, fps: float, fmt: str, quality: int, metadata: dict | None) -> None:
    height, width = frames.shape[1], frames.shape[2]
    pad_h, pad_w = (height % 2, width % 2) if fmt == "mp4" else (0, 0)
    # bitexact: no random track/segment IDs or writing-library tags, so the same frames give the same bytes.
    options = {"fflags": "+bitexact", **({"movflags": "use_metadata_tags"} if fmt == "mp4" else {})}
    with av.open(str(path), mode="w", format=fmt, options=options) as container:
        for key, value in (metadata or {}).items():
            container.metadata[key] = value if isinstance(value, str) else json.dumps(value)
        stream = container.add_stream("libx264" if fmt == "mp4" else "libvpx-vp9", rate=Fraction(round(fps * 1000), 1000))
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        crf = str(quality_to_crf(quality, fmt))
        # x264's macroblock tree is off: it reads memory it never wrote on some frame sizes (seen at 64x64), so the
        # same frames encoded differently from one run to the next; without it the same seed gives the same file.
        # VP9 needs b=0 for constant-quality mode; cpu-used 4 keeps CPU encoding reasonably fast.
        stream.options = ({"crf": crf, "x264-params": "mbtree=0"} if fmt == "mp4" else
                          {"crf": crf, "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"})
        for index, frame in enumerate(frames):
            array = _to_uint8(frame)
            if pad_h or pad_w:
                array = np.pad(array, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            video_frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            video_frame.pts = index
            container.mux(stream.encode(video_frame))
            host.check_interrupt()
        container.mux(stream.encode(None))


def _frame_durations_ms(count: int, fps: float, unit_ms: int) -> list[int]:
    """Per-frame durations in multiples of `unit_ms` whose running sum tracks i*1000/fps (no drift)."""
    ticks = [round(i * 1000.0 / fps / unit_ms) for i in range(count + 1)]
    return [max(b - a, 1) * unit_ms for a, b in zip(ticks, ticks[1:])]


def _webp_exif(metadata: dict[str, Any]) -> Image.Exif:
    """ComfyUI's layout: "key:json" strings in EXIF tags 0x0110 (Model), 0x010F (Make), ... downwards."""
    exif = Image.Exif()
    for offset, (key, value) in enumerate(metadata.items()):
        exif[0x0110 - offset] = f"{key}:{value if isinstance(value, str) else json.dumps(value)}"
    return exif


def _write_pillow_animation(frames, path: Path, fps: float, fmt: str, quality: int, loop: int, metadata) -> None:
    images = []
    for frame in frames:
        images.append(Image.fromarray(_to_uint8(frame), mode="RGB"))
        host.check_interrupt()
    if fmt == "gif":
        options: dict[str, Any] = {"duration": _frame_durations_ms(len(images), fps, 10), "disposal": 1, "optimize": False}
        # GIF stores repetitions *after* the first play; no loop block at all means "play once".
        if loop == 0:
            options["loop"] = 0
        elif loop > 1:
            options["loop"] = loop - 1
        images[0].save(path, format="GIF", save_all=True, append_images=images[1:], **options)
    else:
        q = min(max(int(quality), 0), 100)
        options = {"duration": _frame_durations_ms(len(images), fps, 1), "loop": loop, "quality": q, "lossless": q == 100, "method": 4}
        if metadata:
            options["exif"] = _webp_exif(metadata)
        images[0].save(path, format="WEBP", save_all=True, append_images=images[1:], **options)


def write_png(image: torch.Tensor, path: str | os.PathLike, metadata: dict[str, Any] | None = None, compress_level: int = 4) -> Path:
    """Write one image ([H, W, 3] or [1, H, W, 3]) as PNG atomically, metadata as tEXt chunks of JSON (ComfyUI's way)."""
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        image = image.unsqueeze(0)
    image = check_frames(image, "image")
    if image.shape[0] != 1:
        raise KineFlowError(f"write_png writes one image; got a batch of {image.shape[0]}.")
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    with atomic_write(path) as tmp:
        Image.fromarray(_to_uint8(image[0]), mode="RGB").save(tmp, format="PNG", pnginfo=info, compress_level=compress_level)
    return path


# --------------------------------------------------------------------------- reading
def _check_input_file(path: str | os.PathLike, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{kind} file not found: {path}")
    if not path.is_file():
        raise InputFileError(f"expected a {kind} file but {path} is a folder.")
    return path


def fit_size(src_width: int, src_height: int, width: int, height: int) -> tuple[int, int]:
    """Target size where 0 means 'keep': one side 0 keeps the aspect ratio, both 0 keep the source size."""
    if width <= 0 and height <= 0:
        return src_width, src_height
    if width <= 0:
        return max(round(src_width * height / src_height), 1), height
    if height <= 0:
        return width, max(round(src_height * width / src_width), 1)
    return width, height


class _LazyFrame:
    """A decoded PyAV frame converted to RGB only if it is selected (and only once when it is repeated).

    Pillow frames arrive already converted: Pillow reuses one image object for all frames of a file.
    """

    __slots__ = ("_source", "_array")

    def __init__(self, source):
        self._source = source
        self._array = None

    def rgb(self) -> np.ndarray:
        if self._array is None:
            src = self._source
            self._array = src.to_ndarray(format="rgb24") if isinstance(src, av.VideoFrame) else src
            self._source = None
        return self._array


def _resample(source: Iterator[tuple[float, _LazyFrame]], src_fps: float, force_rate: float) -> Iterator[_LazyFrame]:
    """Yield frames at `force_rate` (dropping or repeating), or unchanged when force_rate <= 0.

    Output frame k shows the last source frame whose timestamp is <= k/force_rate. A tolerance of a quarter
    source frame absorbs container timestamp rounding (webm stores milliseconds).
    """
    if force_rate <= 0:
        for _, frame in source:
            yield frame
        return
    tolerance = 0.25 / src_fps
    k, start, previous = 0, None, None
    for t, frame in source:
        start = t if start is None else start
        t -= start
        if previous is not None:
            while k / force_rate < t - tolerance:
                yield previous
                k += 1
        previous = frame
        last_t = t
    if previous is not None:
        while k / force_rate < last_t + 1.0 / src_fps - tolerance:
            yield previous
            k += 1


def _probe_av(path: Path):
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as error:
        raise InputFileError(f"cannot read {path} as a video: {error}") from error
    if not container.streams.video:
        container.close()
        raise InputFileError(f"{path} contains no video stream (streams: {[s.type for s in container.streams]}).")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if container.duration is not None:
        duration = container.duration / av.time_base
    elif stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = 0.0
    frame_count = stream.frames or (round(duration * fps) if fps else 0)
    info = {"fps": fps, "frame_count": int(frame_count), "width": stream.width, "height": stream.height, "duration": float(duration)}
    return container, stream, info


def _av_source(container, stream, fps: float) -> Iterator[tuple[float, _LazyFrame]]:
    try:
        for index, frame in enumerate(container.decode(stream)):
            t = frame.time if frame.time is not None else index / fps
            yield t, _LazyFrame(frame)
    except av.FFmpegError as error:
        raise InputFileError(f"the video {container.name} is damaged: decoding stopped with: {error}") from error


def _open_pillow_animation(path: Path):
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputFileError(f"refused to read {path}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputFileError(f"cannot read {path} as an animated image: {error}") from error
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        image.close()
        raise InputFileError(f"cannot decode {path}: {error}") from error
    if image.format == "WEBP":
        # Pillow only knows a WebP frame's duration after decoding it; the container lists them all.
        durations = _webp_frame_durations(path) or [100]
    else:
        durations = [frame.info.get("duration") or 100 for frame in ImageSequence.Iterator(image)]
    image.seek(0)
    total_ms = float(sum(durations))
    fps = len(durations) * 1000.0 / total_ms
    info = {"fps": fps, "frame_count": len(durations), "width": image.width, "height": image.height, "duration": total_ms / 1000.0}
    return image, durations, info


def _webp_frame_durations(path: Path) -> list[int]:
    """Durations (ms) of an animated WebP's frames from its ANMF chunks; [] for a still WebP."""
    data = path.read_bytes()
    durations, pos = [], 12  # after "RIFF", size, "WEBP"
    while pos + 8 <= len(data):
        fourcc, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if fourcc == b"ANMF" and size >= 16:
            durations.append(int.from_bytes(data[pos + 20 : pos + 23], "little") or 100)
        pos += 8 + size + (size & 1)
    return durations


def _pillow_source(image: Image.Image, durations: list[int]) -> Iterator[tuple[float, _LazyFrame]]:
    t_ms = 0
    for index, duration in enumerate(durations):
        image.seek(index)
        yield t_ms / 1000.0, _LazyFrame(np.asarray(image.convert("RGB")))
        t_ms += duration


def read_video(
    path: str | os.PathLike,
    frame_cap: int = 0,
    skip_first: int = 0,
    select_every_nth: int = 1,
    force_rate: float = 0,
    size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, dict]:
    """Decode a video into frames [F, H, W, 3] float 0..1 and an info dict.

    Order of operations: resample to `force_rate` (0 = source rate), drop `skip_first` frames, keep every
    `select_every_nth`, stop after `frame_cap` frames (0 = all). Decoding stops as soon as the cap is reached,
    and PyAV frames that are not kept are never converted to RGB.
    size: (width, height) with 0 = keep (one 0 keeps the aspect ratio; both set crops the centre to the new
    aspect, then resizes with antialiased bilinear).

    info: source fps, frame_count (container's count or estimate), width, height, duration (s), plus
    loaded_frames and loaded_fps (rate of the returned frames: (force_rate or fps) / select_every_nth).
    """
    path = _check_input_file(path, "video")
    if select_every_nth < 1 or skip_first < 0 or frame_cap < 0 or force_rate < 0:
        raise KineFlowError(
            f"expected frame_cap >= 0, skip_first >= 0, select_every_nth >= 1, force_rate >= 0; got "
            f"{frame_cap}, {skip_first}, {select_every_nth}, {force_rate}."
        )
    if path.suffix.lower() in _PILLOW_DECODED:
        image, durations, info = _open_pillow_animation(path)
        closer, source = image, _pillow_source(image, durations)
    else:
        container, stream, info = _probe_av(path)
        if not info["fps"] > 0:
            container.close()
            raise InputFileError(f"{path} has no usable frame rate; cannot load it as a video.")
        stream.thread_type = "AUTO"
        closer, source = container, _av_source(container, stream, info["fps"])
    target = None
    if size is not None and (size[0] > 0 or size[1] > 0):
        target = fit_size(info["width"], info["height"], size[0], size[1])
    crop = "center" if size is not None and size[0] > 0 and size[1] > 0 else "disabled"
    # Refused before decoding if the frames kept, plus the one source frame being converted, exceed the budget.
    width, height = target or (info["width"], info["height"])
    frame_bytes, source_frame_bytes = width * height * PIXEL_BYTES, info["width"] * info["height"] * PIXEL_BYTES
    budget = host.read_budget()
    expected = _expected_frames(info, frame_cap, skip_first, select_every_nth, force_rate)
    if expected * frame_bytes + source_frame_bytes > budget:
        closer.close()
        raise _over_budget(path, f"{expected} frames", width, height, budget)
    kept: list[torch.Tensor] = []
    with closer, host.progress(max(info["frame_count"], 1), "Load video") as bar:
        counted = _count_decoded(source, bar)
        for index, frame in enumerate(_resample(counted, info["fps"], force_rate)):
            if index < skip_first or (index - skip_first) % select_every_nth:
                continue
            if (len(kept) + 1) * frame_bytes + source_frame_bytes > budget:  # more frames than the header said
                raise _over_budget(path, f"more than {len(kept)} frames", width, height, budget)
            pixels = _to_float(frame.rgb()).unsqueeze(0)
            if target is not None and (pixels.shape[2], pixels.shape[1]) != target:
                pixels = resize_frames(pixels, target[0], target[1], "bilinear", crop)
            kept.append(pixels)
            if frame_cap and len(kept) >= frame_cap:
                break
    if not kept:
        raise KineFlowError(
            f"no frames left from {path.name} ({info['frame_count']} frames at {info['fps']:.3f} fps) after "
            f"force_rate={force_rate}, skip_first={skip_first}, select_every_nth={select_every_nth}."
        )
    info["loaded_frames"] = len(kept)
    info["loaded_fps"] = (force_rate or info["fps"]) / select_every_nth
    return torch.cat(kept, dim=0), info


def _expected_frames(info: dict, frame_cap: int, skip_first: int, select_every_nth: int, force_rate: float) -> int:
    """How many frames `read_video` returns, from the stream's frame count and duration (known before decoding)."""
    count = math.ceil(info["duration"] * force_rate) if force_rate > 0 else info["frame_count"]
    count = -(-max(count - skip_first, 0) // select_every_nth)
    return min(count, frame_cap) if frame_cap else count


def _over_budget(path: Path, frames: str, width: int, height: int, budget: int) -> InputFileError:
    return InputFileError(
        f"refused to load {path.name}: the memory budget of {budget / 2**30:.2f} GiB does not hold {frames} of "
        f"{width}x{height} ({width * height * PIXEL_BYTES / 2**20:.1f} MiB each as float32 RGB). Load fewer or "
        f"smaller frames (frame_load_cap, select_every_nth, custom_width/custom_height), or {host.RAISE_BUDGET}.")


def _count_decoded(source, bar):
    """Advance the progress bar (which also checks interruption) for every decoded source frame."""
    for item in source:
        yield item
        bar.update(1)


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an image as (IMAGE [1, H, W, 3], MASK [1, H, W]); EXIF rotation applied, first frame only.

    MASK follows ComfyUI's LoadImage: 1 where the image is transparent (1 - alpha), zeros without alpha.
    16-bit images are scaled from 0..65535.
    """
    path = _check_input_file(path, "image")
    try:
        with Image.open(path) as opened:
            budget = host.read_budget()
            if opened.width * opened.height * PIXEL_BYTES > budget:
                raise _over_budget(path, "an image", opened.width, opened.height, budget)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Image.DecompressionBombError as error:  # Pillow's own limit on pixels, checked when the file is opened
        raise InputFileError(f"refused to read {path}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InputFileError(f"cannot read {path} as an image: {error}") from error
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        array = np.asarray(image, dtype=np.float32) / 65535.0
        rgb = torch.from_numpy(np.clip(array, 0, 1)).unsqueeze(-1).expand(-1, -1, 3).contiguous()
        return rgb.unsqueeze(0), torch.zeros(1, image.height, image.width)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA"):
        image = image.convert("RGBA")
    if "A" in image.getbands():
        alpha = _to_float(np.asarray(image.getchannel("A")))
        mask = 1.0 - alpha
    else:
        mask = torch.zeros(image.height, image.width)
    rgb = _to_float(np.asarray(image.convert("RGB")))
    return rgb.unsqueeze(0), mask.unsqueeze(0)


# --------------------------------------------------------------------------- frame operations
def center_crop_to_aspect(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop the centre of frames [F, H, W, C] to the aspect ratio width:height."""
    src_h, src_w = frames.shape[1], frames.shape[2]
    if src_w * height > width * src_h:  # source wider than target
        new_w = max(round(src_h * width / height), 1)
        left = (src_w - new_w) // 2
        return frames[:, :, left : left + new_w]
    new_h = max(round(src_w * height / width), 1)
    top = (src_h - new_h) // 2
    return frames[:, top : top + new_h]


def resize_frames(frames: torch.Tensor, width: int, height: int, method: str = "bilinear", crop: str = "disabled") -> torch.Tensor:
    """Resize frames [F, H, W, 3] to width x height (0 = keep / keep aspect, see fit_size).

    crop="center" first crops the centre to the target aspect ratio so nothing is stretched. bilinear and
    bicubic are antialiased when shrinking; lanczos goes through Pillow frame by frame (8-bit precision).
    """
    frames = check_frames(frames)
    if method not in RESIZE_METHODS:
        raise KineFlowError(f"resize method must be one of {', '.join(RESIZE_METHODS)}; got {method!r}.")
    if crop not in CROP_MODES:
        raise KineFlowError(f"crop must be one of {', '.join(CROP_MODES)}; got {crop!r}.")
    width, height = fit_size(frames.shape[2], frames.shape[1], width, height)
    if crop == "center":
        frames = center_crop_to_aspect(frames, width, height)
    if (frames.shape[2], frames.shape[1]) == (width, height):
        return frames
    if method == "lanczos":
        resized = [
            _to_float(np.asarray(Image.fromarray(_to_uint8(f)).resize((width, height), Image.Resampling.LANCZOS)))
            for f in frames
        ]
        return torch.stack(resized).to(frames.dtype)
    x = frames.movedim(-1, 1).float()
    if method in ("bilinear", "bicubic"):
        x = F.interpolate(x, size=(height, width), mode=method, align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=(height, width), mode=method)
    return x.movedim(1, -1).clamp(0, 1).to(frames.dtype)


def select_frames(frames: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Frames start .. start+count-1 (count 0 = to the end); a negative start counts from the end."""
    frames = check_frames(frames)
    total = frames.shape[0]
    first = start + total if start < 0 else start
    if not 0 <= first < total:
        raise KineFlowError(f"start frame {start} is outside the clip of {total} frames (valid: {-total}..{total - 1}).")
    end = total if count <= 0 else min(first + count, total)
    return frames[first:end]


def every_nth_frame(frames: torch.Tensor, n: int, offset: int = 0) -> torch.Tensor:
    """Frames offset, offset+n, offset+2n, ..."""
    frames = check_frames(frames)
    if n < 1 or offset < 0:
        raise KineFlowError(f"expected n >= 1 and offset >= 0; got n={n}, offset={offset}.")
    if offset >= frames.shape[0]:
        raise KineFlowError(f"offset {offset} leaves no frames of a clip of {frames.shape[0]} frames.")
    return frames[offset::n]


def concat_frames(a: torch.Tensor, b: torch.Tensor, resize_method: str | None = None) -> torch.Tensor:
    """Frames of `a` followed by frames of `b`; `b` is resized to `a`'s size only if resize_method is given."""
    a = check_frames(a, "frames_a")
    b = check_frames(b, "frames_b")
    if a.shape[1:] != b.shape[1:]:
        if resize_method is None:
            raise KineFlowError(
                f"cannot concatenate clips of different sizes: frames_a is {a.shape[2]}x{a.shape[1]}, frames_b is "
                f"{b.shape[2]}x{b.shape[1]} (width x height). Choose a resize method to scale frames_b to frames_a."
            )
        b = resize_frames(b, a.shape[2], a.shape[1], resize_method, "center")
    return torch.cat([a, b.to(device=a.device, dtype=a.dtype)], dim=0)
