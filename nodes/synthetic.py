"""Shapes Video: a procedural test-pattern clip (the training dataset's renderer) as an IMAGE batch."""

from __future__ import annotations

from ..runtime.validation import check_declared
from ..shapes import attributes


class KineFlowShapesVideo:
    DESCRIPTION = (
        "Renders a short clip of a flat shape moving over a flat background, exactly like the clips the tiny "
        "KineFlow models were trained on. Use it as a test pattern for video-to-video or to check a workflow "
        "without a model. The path is centred in the frame; the seed chooses the size, the travel distance and a small offset of the path."
    )
    CATEGORY = "KineFlow/video"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The clip as frames [frames, height, width, 3] in 0..1.",)
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        colours = list(attributes.COLOURS)
        return {
            "required": {
                "shape": (list(attributes.SHAPES), {"default": "circle", "tooltip": "The shape to draw."}),
                "colour": (
                    colours,
                    {"default": "red", "tooltip": "Colour of the shape; must differ from the background."},
                ),
                "background": (colours, {"default": "blue", "tooltip": "Flat background colour."}),
                "direction": (
                    list(attributes.DIRECTIONS),
                    {"default": "right", "tooltip": "Where the shape moves over the clip ('still' keeps it in place)."},
                ),
                "scale_change": (
                    list(attributes.SCALE_CHANGES),
                    {
                        "default": "none",
                        "tooltip": f"Whether the shape grows or shrinks by {attributes.GROWTH_FACTOR}x over the clip.",
                    },
                ),
                "frames": (
                    "INT",
                    {
                        "default": 9,
                        "min": 1,
                        "max": 257,
                        "step": 4,
                        "tooltip": "Number of frames; must be 1 + 4k (1, 5, 9, ...) for the video VAE.",
                    },
                ),
                "width": ("INT", {"default": 64, "min": 16, "max": 1024, "step": 8, "tooltip": "Frame width, pixels."}),
                "height": (
                    "INT",
                    {"default": 64, "min": 16, "max": 1024, "step": 8, "tooltip": "Frame height, pixels."},
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "step": 1,
                        "tooltip": "Chooses the size, the travel distance and a small offset of the centred path.",
                    },
                ),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, colour=None, background=None, frames=None):
        # ComfyUI skips its own list and range checks for the inputs named here: check_declared makes them.
        declared = check_declared(cls, colour=colour, background=background, frames=frames)
        if declared is not True:
            return declared
        if colour is not None and colour == background:
            return f"the shape colour and the background must differ; both are {colour!r}"
        if frames is not None and (frames < 1 or frames % 4 != 1):
            return f"frames must be 1 + 4k (1, 5, 9, 13, ...) for the video VAE; got {frames}"
        return True

    def render(self, shape, colour, background, direction, scale_change, frames, width, height, seed):
        import numpy as np

        from ..shapes import dataset

        rng = np.random.default_rng(seed)
        placed = dataset.place_shape(
            rng, shape, colour, direction, scale_change, frames=frames, height=height, width=width
        )
        spec = dataset.ClipSpec(background, (placed,), frames, height, width)
        return (dataset.clip_tensor(spec),)


NODE_CLASS_MAPPINGS = {"KineFlowShapesVideo": KineFlowShapesVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"KineFlowShapesVideo": "Shapes Video (KineFlow)"}
