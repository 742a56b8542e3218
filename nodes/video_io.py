"""Save Video, Load Video and Load Image nodes (thin wrappers over runtime/media.py, imported when a node runs)."""

from __future__ import annotations

import os

from ..runtime import files, host
from ..runtime.validation import check_declared
from ..errors import InputFileError


def _chosen_file(choice, override=""):
    """The input file a loader should read: `override` (a path) when set, else the dropdown `choice`; None if neither.
    A path outside the input folder raises InputFileError (see host.input_file)."""
    name = override.strip() if override and override.strip() else (choice or "")
    return host.input_file(name) if name else None


def _file_fingerprint(choice, override) -> str:
    """IS_CHANGED value: re-run the loader when the file changes."""
    try:
        path = _chosen_file(choice, override)
    except InputFileError as error:
        return f"refused:{error}"
    return f"{path}:{os.path.getmtime(path)}" if path is not None and path.is_file() else f"missing:{path}"


def _check_chosen(choice, override, kind: str, choice_name: str, override_name: str):
    """VALIDATE_INPUTS result for a loader's chosen file: True or a message."""
    try:
        path = _chosen_file(choice, override)
    except InputFileError as error:
        return str(error)
    if path is None:
        return f"no {kind} chosen: pick a file in '{choice_name}' or set '{override_name}'."
    if not path.is_file():
        return f"{kind} file not found: {path} (relative names are looked up in {host.input_dir()})."
    return True


CATEGORY = "KineFlow/video"


class KineFlowSaveVideo:
    DESCRIPTION = (
        "Encodes frames to mp4 (H.264), webm (VP9), gif or animated webp in the output folder, named "
        "<prefix>_00001_.<ext>. The workflow is embedded so the file can be dragged back onto the canvas "
        "(mp4, webm and webp; gif carries no metadata)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Absolute path of the written file.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames to encode, in order."}),
                "frame_rate": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.01, "tooltip": "Frames per second. gif stores durations in 1/100 s, so its rate is rounded to that."}),
                "filename_prefix": ("STRING", {"default": "KineFlow", "tooltip": "File name prefix; may contain sub-folders of the output folder, e.g. 'videos/KineFlow'."}),
                "format": (list(files.VIDEO_FORMATS), {"default": "mp4", "tooltip": "mp4: H.264 yuv420p (odd sizes padded by one pixel); webm: VP9; gif: 256 colours per frame; webp: animated WebP."}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100, "step": 1, "tooltip": "0-100, higher is better and larger. mp4: CRF = 51*(100-q)/100 (80 -> CRF 10, 100 lossless); webm: CRF = 63*(100-q)/100; webp: WebP quality, 100 = lossless; ignored for gif."}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 1000, "step": 1, "tooltip": "How many times a gif or webp plays; 0 = forever. Ignored for mp4 and webm."}),
                "save_metadata": ("BOOLEAN", {"default": True, "tooltip": "Embed the prompt and workflow so the file restores the workflow when dropped onto ComfyUI."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, frame_rate=None, filename_prefix=None):
        declared = check_declared(cls, frame_rate=frame_rate)
        if declared is not True or filename_prefix is None:
            return declared
        return files.filename_prefix_problem(filename_prefix) or True

    def save(self, images, frame_rate, filename_prefix, format, quality, loop_count, save_metadata, prompt=None, extra_pnginfo=None):
        from ..runtime import media

        metadata = {}
        if save_metadata:
            if prompt is not None:
                metadata["prompt"] = prompt
            metadata.update(extra_pnginfo or {})
        path, result = media.save_video(images, host.output_dir(), filename_prefix, format, frame_rate, quality,
                                        loop_count, metadata)
        # The frontend shows animated results in a <video> element unless the name contains webp/png,
        # so a gif is reported as a still image result, which the browser animates in an <img>.
        return {"ui": {"images": [result], "animated": (format != "gif",)}, "result": (str(path),)}


class KineFlowLoadVideo:
    DESCRIPTION = (
        "Loads a video (mp4, webm, mkv, mov, avi, gif, webp) as frames from the input folder, or from video_path "
        "when that is set. Options resample the frame rate, skip and thin frames, cap the count and resize."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT")
    RETURN_NAMES = ("images", "frame_count", "fps")
    OUTPUT_TOOLTIPS = (
        "The loaded frames.",
        "Number of frames returned.",
        "Frame rate of the returned frames: (force_rate or the source rate) / select_every_nth.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        videos = files.list_input_files(host.input_dir(), files.VIDEO_EXTENSIONS)
        return {
            "required": {
                "video": (videos, {"tooltip": "A video file in the input folder. Ignored when video_path is set.", "video_upload": True}),
                "frame_load_cap": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1, "tooltip": "Maximum number of frames to return; 0 = all. Decoding stops once reached."}),
                "skip_first_frames": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1, "tooltip": "Frames to drop from the start (counted after force_rate)."}),
                "select_every_nth": ("INT", {"default": 1, "min": 1, "max": 1000, "step": 1, "tooltip": "Keep one frame in n (after skipping)."}),
                "force_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 240.0, "step": 0.01, "tooltip": "Resample to this frame rate by dropping or repeating frames; 0 = keep the source rate."}),
                "custom_width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1, "tooltip": "Output width; 0 = keep (or follow the aspect ratio if only the height is set). With both set, the centre is cropped to the new aspect."}),
                "custom_height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1, "tooltip": "Output height; 0 = keep (or follow the aspect ratio if only the width is set)."}),
            },
            "optional": {
                "video_path": ("STRING", {"default": "", "tooltip": "A video path that overrides the 'video' choice, relative to the input folder and inside it (an absolute path only when given on the kineflow command line with --set). Leave empty to use 'video'."}),
            },
        }

    def load(self, video, frame_load_cap, skip_first_frames, select_every_nth, force_rate, custom_width, custom_height, video_path=""):
        from ..runtime import media

        path = _chosen_file(video, video_path)
        if path is None:
            raise InputFileError("no video chosen: pick a file in 'video' or set 'video_path'.")
        frames, info = media.read_video(path, frame_load_cap, skip_first_frames, select_every_nth, force_rate, (custom_width, custom_height))
        return (frames, int(frames.shape[0]), float(info["loaded_fps"]))

    @classmethod
    def IS_CHANGED(cls, video, video_path="", **_):
        return _file_fingerprint(video, video_path)

    @classmethod
    def VALIDATE_INPUTS(cls, video=None, video_path=None, force_rate=None):
        declared = check_declared(cls, force_rate=force_rate)
        if declared is not True:
            return declared
        return _check_chosen(video, video_path, "video", "video", "video_path")


class KineFlowLoadImage:
    DESCRIPTION = "Loads an image from the input folder (or image_path) as IMAGE and its transparency as MASK (1 = transparent)."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The image, RGB.", "1 - alpha, or zeros when the image has no alpha channel.")

    @classmethod
    def INPUT_TYPES(cls):
        images = files.list_input_files(host.input_dir(), files.IMAGE_EXTENSIONS)
        return {
            "required": {"image": (images, {"tooltip": "An image file in the input folder. Ignored when image_path is set.", "image_upload": True})},
            "optional": {"image_path": ("STRING", {"default": "", "tooltip": "An image path that overrides the 'image' choice, relative to the input folder and inside it (an absolute path only when given on the kineflow command line with --set)."})},
        }

    def load(self, image, image_path=""):
        from ..runtime import media

        path = _chosen_file(image, image_path)
        if path is None:
            raise InputFileError("no image chosen: pick a file in 'image' or set 'image_path'.")
        return media.read_image(path)

    @classmethod
    def IS_CHANGED(cls, image, image_path="", **_):
        return _file_fingerprint(image, image_path)

    @classmethod
    def VALIDATE_INPUTS(cls, image=None, image_path=None):
        return _check_chosen(image, image_path, "image", "image", "image_path")


NODE_CLASS_MAPPINGS = {
    "KineFlowSaveVideo": KineFlowSaveVideo,
    "KineFlowLoadVideo": KineFlowLoadVideo,
    "KineFlowLoadImage": KineFlowLoadImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowSaveVideo": "Save Video (KineFlow)",
    "KineFlowLoadVideo": "Load Video (KineFlow)",
    "KineFlowLoadImage": "Load Image (KineFlow)",
}
