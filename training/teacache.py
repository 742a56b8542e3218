"""Fit the TeaCache polynomial of a HunyuanVideo-family transformer and write it into the file's metadata.

    python -m kineflow.training.teacache weights/diffusion_models/kineflow_tiny_dit.safetensors

The Step Cache (samplers/step_cache.py) estimates how much the transformer's output changes from one step to the
next from how much its probe changes (the first double block's modulated video input), through a polynomial fitted
per model. The published one was fitted on the released 13 B model; a model trained here needs its own. This samples
the model uncached on training-split prompts of the shapes world (never the held-out ones `kineflow eval` scores),
at the shipped workflow's size, shift and sampler and at several step counts, records per step the relative L1
change of the probe (x) and of the model output (y) from the previous step, and fits y = P(x) of degree 4 by least
squares, as TeaCache fits its polynomials (`fitted_on.r2` in the entry says how much of y's variance x explains).
The result goes into the metadata (`kineflow.teacache_coefficients`); every tensor byte stays as it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from ..errors import KineFlowError
from ..runtime import host
from ..runtime.evaluation import shipped_workflow_settings
from ..runtime.generation import empty_latent, encode_prompts
from ..runtime.video_models import load_text_encoders, load_video_model
from ..samplers.noise import seeded_noise
from ..samplers.sampling import sample
from ..samplers.step_cache import COEFFICIENTS_METADATA_KEY, relative_l1
from ..shapes.dataset import caption, sample_spec
from ..shapes.shipped import HUNYUAN_VIDEO
from .common import set_threads
from .tiny_models import set_metadata

DEGREE = 4


class _ProbeRecorder:
    """A step-cache hook that never skips and keeps every probe it is shown."""

    def __init__(self):
        self.probes: list[torch.Tensor] = []

    def reuse(self, probe: torch.Tensor) -> None:
        self.probes.append(probe)
        return None

    def store(self, residual: torch.Tensor) -> None:
        pass


def _changes(tensors: list[torch.Tensor]) -> list[float]:
    """The relative L1 change into each step but the last: the last step always runs the blocks, so the change into
    it (the largest of a run, as the output moves fast at the end of the schedule) is never estimated."""
    return [float(relative_l1(b, a)[0]) for a, b in zip(tensors[:-2], tensors[1:-1])]


def record_changes(model, text, prompts: list[str], steps, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probe change, output change) into each step but the first and last, over every prompt and step count."""
    settings = shipped_workflow_settings("hunyuan_video")
    latent = empty_latent("hunyuan_video", settings.width, settings.height, settings.frames, 1)["samples"]
    x, y = [], []
    for i, prompt in enumerate(prompts):
        cond = model.net_kwargs(encode_prompts(text, prompt)["positive"], 1.0, 1)
        for count in steps:
            recorder, outputs = _ProbeRecorder(), []

            def net_fn(latents, timestep, **kwargs):
                outputs.append(model.net_fn(latents, timestep, step_cache=recorder, **kwargs))
                return outputs[-1]

            denoiser = model.model_sampling.wrap(net_fn)
            sample(model.model_sampling, lambda v, sigma: denoiser(v, sigma, **cond),
                   seeded_noise(latent.shape, seed + i, device="cpu"),
                   model.sigmas(count, settings.shift, 1.0, settings.scheduler), settings.sampler_name)
            x += _changes(recorder.probes)
            y += _changes(outputs)
    return np.array(x), np.array(y)


def training_prompts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 7919])
    settings = shipped_workflow_settings("hunyuan_video")
    return [caption(sample_spec(rng, "train", height=settings.height, width=settings.width), rng, "train")
            for _ in range(count)]


def fit(path: Path, llm: str = HUNYUAN_VIDEO["llm"], clip: str = HUNYUAN_VIDEO["clip"], prompts: int = 16,
        steps: tuple[int, ...] = (8, 16, 30, 50), seed: int = 0) -> dict:
    """Fit the polynomial of the transformer at `path` and store it in its metadata; returns the stored entry."""
    path = Path(path).resolve()
    if path.suffix != ".safetensors":
        raise KineFlowError(f"{path.name}: expected a .safetensors transformer (its metadata holds the polynomial)")
    with host.configured(device="cpu"), host.quiet():
        model = load_video_model(str(path), weight_dtype="fp32")
        text = load_text_encoders(llm, clip, dtype_name="fp32")
        x, y = record_changes(model, text, training_prompts(prompts, seed), steps, seed)
    coefficients = np.polyfit(x, y, DEGREE)
    residual = y - np.polyval(coefficients, x)
    entry = {"coefficients": [float(c) for c in coefficients],
             "fitted_on": {"prompts": prompts, "steps": list(steps), "seed": seed, "points": len(x),
                           "probe_change_range": [float(x.min()), float(x.max())], "degree": DEGREE,
                           "r2": float(1 - residual.var() / y.var())}}
    set_metadata(path, {COEFFICIENTS_METADATA_KEY: json.dumps(entry)})
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kineflow.training.teacache", description=__doc__.split("\n\n")[0])
    parser.add_argument("transformer", help="a HunyuanVideo-family transformer (.safetensors)")
    parser.add_argument("--llm", default=HUNYUAN_VIDEO["llm"], help="LLaMA text encoder (default: the shipped one)")
    parser.add_argument("--clip", default=HUNYUAN_VIDEO["clip"], help="CLIP text encoder (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=16, help="training-split prompts to sample (default 16)")
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 16, 30, 50],
                        help="step counts to sample each prompt at (default 8 16 30 50)")
    parser.add_argument("--seed", type=int, default=0, help="of the prompts drawn and of the first prompt's noise")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        entry = fit(Path(args.transformer), args.llm, args.clip, args.prompts, args.steps, args.seed)
    except KineFlowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"{args.transformer}: {COEFFICIENTS_METADATA_KEY} = {json.dumps(entry)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
