"""Frame utilities on IMAGE batches: select, thin, concatenate, resize, inspect (logic in runtime/media.py, imported
when a node runs)."""

from __future__ import annotations

from ..runtime import files

CATEGORY = "KineFlow/video"
_IMAGES = ("IMAGE", {"tooltip": "Frames [frames, height, width, 3]."})


class KineFlowSelectFrames:
    DESCRIPTION = "Keeps `count` frames starting at frame `start` (0-based; negative counts from the end; count 0 = to the end)."
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": _IMAGES,
                "start": ("INT", {"default": 0, "min": -100000, "max": 100000, "step": 1, "tooltip": "First frame to keep, 0-based; -1 is the last frame."}),
                "count": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1, "tooltip": "Number of frames to keep; 0 = all frames from start to the end."}),
            }
        }

    def select(self, images, start, count):
        from ..runtime import media

        return (media.select_frames(images, start, count),)


class KineFlowEveryNthFrame:
    DESCRIPTION = "Keeps frames offset, offset+n, offset+2n, ... (e.g. n=2 halves the frame rate)."
    CATEGORY = CATEGORY
    FUNCTION = "thin"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": _IMAGES,
                "n": ("INT", {"default": 2, "min": 1, "max": 1000, "step": 1, "tooltip": "Keep one frame in n."}),
                "offset": ("INT", {"default": 0, "min": 0, "max": 100000, "step": 1, "tooltip": "Index of the first kept frame."}),
            }
        }

    def thin(self, images, n, offset):
        from ..runtime import media

        return (media.every_nth_frame(images, n, offset),)


class KineFlowConcatenateFrames:
    DESCRIPTION = "Appends the frames of clip B after clip A. Sizes must match unless a resize method is chosen for B."
    CATEGORY = CATEGORY
    FUNCTION = "concat"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images_a": ("IMAGE", {"tooltip": "The first clip."}),
                "images_b": ("IMAGE", {"tooltip": "The clip appended after the first one."}),
                "resize": (["disabled", *files.RESIZE_METHODS], {"default": "disabled", "tooltip": "When the sizes differ: 'disabled' stops with an error; a method scales clip B to clip A's size (centre crop, no stretching)."}),
            }
        }

    def concat(self, images_a, images_b, resize):
        from ..runtime import media

        return (media.concat_frames(images_a, images_b, None if resize == "disabled" else resize),)


class KineFlowResizeFrames:
    DESCRIPTION = "Resizes every frame. 0 keeps that side (or follows the aspect ratio when the other side is set)."
    CATEGORY = CATEGORY
    FUNCTION = "resize"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": _IMAGES,
                "width": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 1, "tooltip": "Target width in pixels; 0 = keep / follow the aspect ratio."}),
                "height": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 1, "tooltip": "Target height in pixels; 0 = keep / follow the aspect ratio."}),
                "method": (list(files.RESIZE_METHODS), {"default": "bilinear", "tooltip": "Interpolation; bilinear and bicubic are antialiased when shrinking; area suits large reductions."}),
                "crop": (list(files.CROP_MODES), {"default": "disabled", "tooltip": "center: crop the centre to the target aspect ratio first, so nothing is stretched."}),
            }
        }

    def resize(self, images, width, height, method, crop):
        from ..runtime import media

        return (media.resize_frames(images, width, height, method, crop),)


class KineFlowFrameInfo:
    DESCRIPTION = "Reports the number of frames and the frame size of a clip."
    CATEGORY = CATEGORY
    FUNCTION = "info"
    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("frame_count", "width", "height")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": _IMAGES}}

    def info(self, images):
        from ..runtime import media

        frames = media.check_frames(images)
        return (int(frames.shape[0]), int(frames.shape[2]), int(frames.shape[1]))


NODE_CLASS_MAPPINGS = {
    "KineFlowSelectFrames": KineFlowSelectFrames,
    "KineFlowEveryNthFrame": KineFlowEveryNthFrame,
    "KineFlowConcatenateFrames": KineFlowConcatenateFrames,
    "KineFlowResizeFrames": KineFlowResizeFrames,
    "KineFlowFrameInfo": KineFlowFrameInfo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowSelectFrames": "Select Frames (KineFlow)",
    "KineFlowEveryNthFrame": "Every Nth Frame (KineFlow)",
    "KineFlowConcatenateFrames": "Concatenate Frames (KineFlow)",
    "KineFlowResizeFrames": "Resize Frames (KineFlow)",
    "KineFlowFrameInfo": "Frame Info (KineFlow)",
}
