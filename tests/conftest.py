"""Shared pytest fixtures.

`fixture_nodes` is a tiny set of ComfyUI V1 node classes (independent of the pack's real nodes) for
testing the workflow runner: a seeded noise node, a combo, an IMAGE producer, an output node with hidden
inputs and one with VALIDATE_INPUTS. Every call is recorded in `CALLS` so tests can check order and caching.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kineflow.runtime import host

DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(autouse=True, scope="session")
def _fp32_for_dtype_auto():
    """`dtype: auto` is fp32 in the suite's own process on every CPU: on a CPU with native bf16 it would be bf16
    (runtime/cpu.py), and the parity and exact-output checks are written for fp32. Session-wide, so that
    module-scoped fixtures load their models after it. tests/test_cpu_choice.py tests the choice itself;
    subprocess runs choose as users' runs do."""
    from kineflow.runtime import cpu

    before = cpu._dtype_choice
    cpu._dtype_choice = ("fp32", "the test suite pins fp32")
    yield
    cpu._dtype_choice = before
CALLS: list[tuple[str, dict]] = []


def _record(name: str, **kwargs) -> None:
    CALLS.append((name, kwargs))


class TImage:
    """IMAGE producer: a solid colour [1, H, W, 3]."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 4, "min": 1, "max": 64, "step": 1}),
            "height": ("INT", {"default": 4, "min": 1, "max": 64, "step": 1}),
            "color": (["red", "green", "blue"], {"default": "red"}),
        }}

    def make(self, width, height, color):
        _record("TImage", width=width, height=height, color=color)
        image = torch.zeros(1, height, width, 3)
        image[..., ["red", "green", "blue"].index(color)] = 1.0
        return (image,)


class TNoise:
    """Adds seeded noise; `seed` gets a control_after_generate value in UI workflows by name."""

    RETURN_TYPES = ("IMAGE", "INT")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "optional": {
            "mask": ("IMAGE",),
            "steps": ("INT", {"default": 1, "min": 1, "max": 10, "control_after_generate": True}),
        }}

    def apply(self, image, seed, strength, mask=None, steps=1):
        _record("TNoise", seed=seed, strength=strength, steps=steps, has_mask=mask is not None)
        g = torch.Generator().manual_seed(seed)
        return (image + strength * torch.rand(image.shape, generator=g), seed)


class TBlend:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blend"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("IMAGE",), "b": ("IMAGE",),
                             "factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0})}}

    def blend(self, a, b, factor):
        _record("TBlend", factor=factor)
        return (a * (1 - factor) + b * factor,)


class TLabel:
    """VALIDATE_INPUTS node: the label must not be empty and must not contain '/'."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "label"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "clip"}), "any": ("*",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, text):
        if not text or "/" in text:
            return f"label {text!r} must be non-empty and contain no '/'"
        return True

    def label(self, text, any):
        _record("TLabel", text=text)
        return (f"{text}:{type(any).__name__}",)


class TSave:
    """Output node with hidden inputs; returns a ui dict like ComfyUI's save nodes."""

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "out"})},
                "optional": {"label": ("STRING", {"forceInput": True})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"}}

    def save(self, images, filename_prefix, label=None, prompt=None, extra_pnginfo=None, unique_id=None):
        _record("TSave", prefix=filename_prefix, label=label, prompt=prompt, extra_pnginfo=extra_pnginfo,
                unique_id=unique_id, mean=float(images.mean()), output_dir=host.output_dir())
        return {"ui": {"images": [{"filename": f"{filename_prefix}_00001.png"}]}, "result": ()}


class TFail:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        raise ValueError("tensor shapes do not line up")


class TStop:
    """Asks the host to interrupt, like a user pressing Ctrl-C / Cancel while this node runs."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        from kineflow.runtime import host

        _record("TStop")
        host.request_interrupt()
        return (image,)


class TVolatile:
    """IS_CHANGED returns NaN: ComfyUI re-runs such a node (and what depends on it) every time."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, image):
        return float("nan")

    def run(self, image):
        _record("TVolatile")
        return (image,)


FIXTURE_NODES = {cls.__name__: cls for cls in (TImage, TNoise, TBlend, TLabel, TSave, TFail, TStop, TVolatile)}


@pytest.fixture
def fixture_nodes():
    """The fixture node classes, with the call log cleared."""
    CALLS.clear()
    return dict(FIXTURE_NODES)


@pytest.fixture
def calls():
    return CALLS


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module (training tests use it): tiny convolutions gain nothing from a
    second thread, and on a loaded machine two threads that wait for each other run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shipped_only_models_dir(tmp_path_factory):
    """An empty models folder, configured for the module: only the pack's shipped weights/ are visible, as on a
    fresh clone."""
    from kineflow.runtime import host

    empty = tmp_path_factory.mktemp("no_models")
    with host.configured(models_dir=empty):
        yield empty
