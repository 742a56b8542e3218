"""Cost of the Sampler's animated live preview next to the sampling step it follows, on the CPU.

For each case the script samples with a shipped tiny model and records when every step ends (standalone, so no
preview is built), then builds the preview of the run's final latent as the Sampler does inside ComfyUI (latent ->
RGB frames, PNG strip, base64 message) many times, and prints the median step, the median preview and their ratio,
against the budget the Sampler keeps to (runtime/previews.py BUDGET_SHARE).

Cases: the shipped workflows (text_to_video: 9 frames of 128x128, 8 steps; animatediff_tiny: 16 frames of 64x64,
20 steps, cfg 4) and, with --full-size, the latents of the full-size workflows (hunyuan_video_t2v: 73 frames of
848x480; animatediff_sd15: 32 frames of 512x512, cfg 7.5, 16-frame context windows) sampled for two steps by the
tiny models (with the shipped workflows' prompts). A released model does far more work per step on the same
latent while the preview costs the same, so its ratio is smaller still.

    python benchmarks/bench_previews.py [--full-size] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kineflow.runtime import animatediff as ad
from kineflow.runtime import generation, host, previews, video_models
from kineflow.samplers.context import ContextOptions

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows" / "api"
SHIPPED_WORKFLOW = {"hunyuan_video": "text_to_video", "animatediff": "animatediff_tiny"}  # their prompts are used
PREVIEW_REPEATS = 30


class StepClock:
    """Stands in for the host's progress bar during sampling: notes when each step ends, shows no preview."""

    shows_previews = False

    def __init__(self, total: int, desc: str = ""):
        self.ends = [time.perf_counter()]

    def update(self, n: int = 1, preview=None) -> None:
        self.ends.append(time.perf_counter())


def nodes_of(workflow: str) -> dict:
    """The workflow's inputs by node class (one node of each class)."""
    prompt = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
    return {node["class_type"]: node["inputs"] for node in prompt.values()}


def load_family(family: str):
    """(model, text encoder) of the shipped tiny model of a family."""
    if family == "hunyuan_video":
        return (video_models.load_video_model("kineflow_tiny_dit.safetensors"),
                video_models.load_text_encoders("kineflow_tiny_llm", "kineflow_tiny_clip.safetensors"))
    model, _vae, text_encoder = ad.load_sd_checkpoint("kineflow_tiny_sd15.safetensors")
    return ad.apply_motion_module(model, ad.load_motion_module("kineflow_tiny_mm.safetensors")), text_encoder


def measure(workflow: str, family: str, model, text_encoder, steps: int | None = None) -> dict:
    nodes = nodes_of(workflow)
    size, settings = nodes["KineFlowEmptyVideoLatent"], dict(nodes["KineFlowSampler"])
    settings = {key: value for key, value in settings.items() if not isinstance(value, list)}  # drop the links
    settings["steps"] = steps or settings["steps"]
    context = nodes.get("KineFlowContextOptions")
    prompt = nodes_of(SHIPPED_WORKFLOW[family])["KineFlowTextEncode"]  # words the tiny models know
    conditioning = generation.encode_prompts(text_encoder, prompt["prompt"], prompt["negative_prompt"])
    latent = generation.empty_latent(size["latent_format"], size["width"], size["height"], size["frames"], 1)
    clock, progress = None, host.progress

    def recording(total, desc=""):
        nonlocal clock
        clock = StepClock(total, desc)
        return clock

    host.progress = recording
    try:
        samples = generation.sample_video(model, conditioning, latent, context=ContextOptions(**context) if context
                                          else None, **settings)["samples"]
    finally:
        host.progress = progress
    step = statistics.median(b - a for a, b in zip(clock.ends, clock.ends[1:]))
    factors, ratio = model.preview_factors, model.latent_format.temporal_ratio
    costs = []
    for _ in range(PREVIEW_REPEATS):
        began = time.perf_counter()
        message = previews.animated_preview(samples, *factors, ratio).message()
        costs.append(time.perf_counter() - began)
    preview = statistics.median(costs)
    return {"workflow": workflow, "latent": list(samples.shape), "steps": settings["steps"], "step_ms": step * 1e3,
            "preview_ms": preview * 1e3, "ratio": preview / step, "frames": message["frames"],
            "frame_size": f"{message['width']}x{message['height']}", "message_kb": len(message["image"]) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="also the full-size workflows' latents (slow)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("text_to_video", "hunyuan_video", None), ("animatediff_tiny", "animatediff", None)]
    if args.full_size:
        cases += [("hunyuan_video_t2v", "hunyuan_video", 2), ("animatediff_sd15", "animatediff", 2)]
    models = {}
    print(f"{'workflow':<18} {'latent':<22} {'step ms':>9} {'preview ms':>11} {'ratio':>7}  preview")
    for workflow, family, steps in cases:
        if family not in models:
            models[family] = load_family(family)
        r = measure(workflow, family, *models[family], steps=steps)
        verdict = "OK" if r["ratio"] < previews.BUDGET_SHARE else "ABOVE BUDGET"
        print(f"{r['workflow']:<18} {str(r['latent']):<22} {r['step_ms']:9.1f} {r['preview_ms']:11.2f} "
              f"{r['ratio']:7.2%}  {r['frames']} frames of {r['frame_size']}, {r['message_kb']:.0f} KiB  {verdict}")
    print(f"budget: previews take at most {previews.BUDGET_SHARE:.0%} of the sampling time (the Sampler thins them "
          "out beyond it)")


if __name__ == "__main__":
    main()
