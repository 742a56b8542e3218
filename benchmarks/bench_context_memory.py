"""Peak memory of AnimateDiff sampling: 64 frames with context windows (length 16, overlap 4) vs 16 frames.

Context windows should keep activation memory bounded by the window: the UNet and motion module only ever see
16 frames at a time, so the 64-frame run should peak close to the 16-frame run (target: <= 1.5x), although its
latent is 4x longer. Each run is a fresh subprocess on tiny random-weight files in the real layouts
(training/tiny_sd.py); the figure is the growth of the process's peak RSS during sampling, after a warm-up.
Latents are 32x32 (256 px video) so that activations, not weights, dominate. (Without windows a 64-frame
run is not possible at all: the v3 module's positional table holds 32 frames.)

    python benchmarks/bench_context_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, torch
from kineflow.runtime import host, generation
from kineflow.runtime.animatediff import load_sd_checkpoint, load_motion_module, apply_motion_module
from kineflow.samplers.context import ContextOptions
torch.set_num_threads(2)
models_dir, frames, windowed = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
host.configure(models_dir=models_dir)
unet, vae, text = load_sd_checkpoint("kineflow_random_sd15.safetensors")
model = apply_motion_module(unet, load_motion_module("kineflow_random_mm_v3.safetensors"), 1.0)
cond = generation.encode_prompts(text, "a red circle moves to the left", "")
context = ContextOptions(length=16, overlap=4) if windowed else None
def run(n, h):
    latent = generation.empty_latent("sd15", h, h, n, 1)
    with host.quiet():
        return generation.sample_video(model, cond, latent, seed=0, steps=2, cfg=1.0, shift=1.0,
                                       embedded_guidance=1.0, sampler_name="euler", context=context)
run(2, 64)  # warm-up: kernels and allocator set-up belong to the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(frames, 256)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": frames, "windowed": windowed, "peak_mib": (peak - base) / 1024}))
"""


def measure(models_dir: str, frames: int, windowed: bool) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", CHILD, models_dir, str(frames), "1" if windowed else "0"],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    from kineflow.training import tiny_sd

    with tempfile.TemporaryDirectory() as models_dir:
        tiny_sd.write_models(models_dir, seed=0)
        short = measure(models_dir, 16, windowed=False)
        long = measure(models_dir, 64, windowed=True)
    print("AnimateDiff sampling peak memory (tiny random SD1.5 + v3 motion module, 256x256, 2 euler steps)")
    print(f"  16 frames, no windows            {short:8.1f} MiB")
    print(f"  64 frames, windows 16 / overlap 4 {long:8.1f} MiB   ratio {long / short:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
