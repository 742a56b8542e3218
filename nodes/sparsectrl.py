"""SparseCtrl nodes (AnimateDiff v3's sparse controls): Load SparseCtrl and Apply SparseCtrl.

Apply SparseCtrl returns a new model handle that the shared Sampler runs with the control net at every step; the work
is in runtime/animatediff.py, imported when a node runs.
"""

from ..errors import KineFlowError
from ..runtime.validation import check_declared
from ._common import (ATTENTION_INPUT, DTYPE_CHOICES, DTYPE_TOOLTIP, OFFLOAD_INPUT, check_model_files,
                      model_choices as _choices)

MAX_KEYFRAMES = 1024


def parse_frame_indices(text: str) -> tuple[int, ...]:
    """"0", "0,8,15" or "0, -1" -> the video frames of the keyframes, in order (negative: counted from the end).
    Raises ValueError with what was expected and what was found."""
    parts = [part.strip() for part in str(text).replace(";", ",").split(",")]
    if parts == [""]:
        raise ValueError("frame_indices is empty; expected one video frame per keyframe image, e.g. 0 or 0,8,15")
    if len(parts) > MAX_KEYFRAMES:
        raise ValueError(f"frame_indices lists {len(parts)} frames; at most {MAX_KEYFRAMES}")
    frames = []
    for part in parts:
        try:
            frames.append(int(part))
        except ValueError:
            raise ValueError(f"frame_indices has {part[:20]!r}, not a whole number; expected frames such as 0,8,15 "
                             "(negative counts from the end: -1 is the last frame)") from None
    if len(set(frames)) != len(frames):
        raise ValueError(f"frame_indices names a frame twice: {text.strip()[:80]}")
    return tuple(frames)


class KineFlowLoadSparseCtrl:
    DESCRIPTION = ("Loads an AnimateDiff v3 SparseCtrl from controlnet/: v3_sd15_sparsectrl_rgb.ckpt (keyframes as "
                   "images, encoded by the VAE) or v3_sd15_sparsectrl_scribble.ckpt (scribbles), or a diffusers "
                   "SparseControlNetModel. The kind is told from the file.")
    CATEGORY = "KineFlow/loaders"
    RETURN_TYPES = ("KINEFLOW_SPARSECTRL",)
    RETURN_NAMES = ("sparsectrl",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sparsectrl_name": (_choices("controlnet", folders=True), {"tooltip": "SparseCtrl (e.g. v3_sd15_sparsectrl_rgb.ckpt, or a diffusers model folder) in models/controlnet."}),
            "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        }, "optional": {"offload": OFFLOAD_INPUT, "attention": ATTENTION_INPUT}}

    @classmethod
    def VALIDATE_INPUTS(cls, sparsectrl_name=None):
        return check_model_files(("controlnet", sparsectrl_name, "sparsectrl"))

    def load(self, sparsectrl_name, dtype, offload="auto", attention="auto"):
        from ..runtime import animatediff as ad_runtime

        return (ad_runtime.load_sparsectrl(sparsectrl_name, dtype, offload, attention),)


class KineFlowApplySparseCtrl:
    DESCRIPTION = ("Guides an AnimateDiff model with keyframes at chosen video frames (SparseCtrl): the images in "
                   "order, one per frame index. An rgb SparseCtrl needs the VAE. Returns a new model for the Sampler; "
                   "chain several to combine them.")
    CATEGORY = "KineFlow/animatediff"
    RETURN_TYPES = ("KINEFLOW_VIDEO_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("KINEFLOW_VIDEO_MODEL", {"tooltip": "From Apply Motion Module (or Load SD Checkpoint)."}),
            "sparsectrl": ("KINEFLOW_SPARSECTRL", {"tooltip": "From Load SparseCtrl."}),
            "images": ("IMAGE", {"tooltip": "The keyframes, one per frame index (rgb: pictures; scribble: white lines on black). They are centre-cropped to the video's shape and resized."}),
            "frame_indices": ("STRING", {"default": "0", "tooltip": "The video frame of each image, comma-separated: 0, or 0,8,15. Negative counts from the end (-1 = last frame)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Scales the control's additions to the UNet; 0 turns it off."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Share of the sampling (0 = first step) where the control starts acting."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001, "tooltip": "Share of the sampling (1 = last step) where the control stops acting."}),
        }, "optional": {
            "vae": ("KINEFLOW_VAE", {"tooltip": "The SD VAE (from Load SD Checkpoint): required by an rgb SparseCtrl, which takes the keyframes' latents."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, frame_indices=None, strength=None, start_percent=None, end_percent=None):
        declared = check_declared(cls, strength=strength, start_percent=start_percent, end_percent=end_percent)
        if declared is not True:
            return declared
        if frame_indices is not None:
            try:
                parse_frame_indices(frame_indices)
            except ValueError as error:
                return str(error)
        if start_percent is not None and end_percent is not None and start_percent > end_percent:
            return f"start_percent ({start_percent}) is after end_percent ({end_percent}); the control would never act"
        return True

    def apply(self, model, sparsectrl, images, frame_indices, strength, start_percent, end_percent, vae=None):
        from ..runtime import animatediff as ad_runtime

        try:
            frames = parse_frame_indices(frame_indices)
        except ValueError as error:
            raise KineFlowError(str(error)) from None
        return (ad_runtime.apply_sparsectrl(model, sparsectrl, images, frames, strength, start_percent, end_percent,
                                            vae),)


NODE_CLASS_MAPPINGS = {
    "KineFlowLoadSparseCtrl": KineFlowLoadSparseCtrl,
    "KineFlowApplySparseCtrl": KineFlowApplySparseCtrl,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KineFlowLoadSparseCtrl": "Load SparseCtrl (KineFlow)",
    "KineFlowApplySparseCtrl": "Apply SparseCtrl (KineFlow)",
}
