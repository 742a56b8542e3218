"""Full-size models on a CPU within a memory budget: peak resident memory and seconds per step per offload policy.

Writes random-weight checkpoints with the real full-size key sets and shapes (tests/data/checkpoints) once into a
cache folder outside the repository (about 43 GB: check `df -h` first; `--delete` removes them), then runs each
measurement in a fresh process:

- the HunyuanVideo transformer (12.8 B parameters, ComfyUI layout, a bf16 file of 25.6 GB): one sampler step of a
  256x256, 5-frame video with 32 text tokens, under `blocks` and `sequential`;
- the LLaVA-LLaMA-3-8B text encoder (a bf16 file of 15 GB) + CLIP-L: one prompt, under `blocks` and `sequential`;
- SD1.5 (an LDM checkpoint) + the v2 motion module: one step of 16 frames at 256x256, under `full` and `blocks`.

Each measurement runs the step twice (the first pass learns the order in which blocks run; fetching ahead
starts with the second) and reports: the peak resident set size of the process over both (ru_maxrss: weights
are read with pread, no file stays mapped), the seconds of the second step, and the GB read from files
(/proc/self/io rchar) while loading and during the second step. The process computes in fp32 (the
CPU default), so a bf16 block is read and widened when it runs.

    python benchmarks/bench_offload.py [--cache DIR] [--budget-gib 4] [--only dit,llama,sd] [--delete]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "tests" / "data" / "checkpoints"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kineflow-bench"

FILES = {  # file in the cache -> (manifests with their key prefixes)
    "diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors": [("hunyuan_video_dit_comfy", "")],
    "text_encoders/llava_llama3_bf16.safetensors": [("llava_llama3_8b_text_hf", "")],
    "text_encoders/clip_l.safetensors": [("clip_l_text_hf", "")],
    "checkpoints/v1-5-pruned-emaonly.safetensors": [("sd15_unet_ldm", ""), ("sd_vae_ldm", ""),
                                                   ("clip_l_text_hf", "cond_stage_model.transformer.")],
    "animatediff_models/mm_sd_v15_v2.safetensors": [("animatediff_mm_sd_v15_v2", "")],
}
SKIP = {"lm_head.weight", "text_model.embeddings.position_ids"}  # not read by encoders


def _shapes(entries) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for manifest, prefix in entries:
        tensors = json.loads((MANIFESTS / f"{manifest}.json").read_text())["tensors"]
        shapes.update({prefix + k: tuple(v["shape"]) for k, v in tensors.items() if k not in SKIP})
    return shapes


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    """A bf16 .safetensors file streamed tensor by tensor (never more than one chunk in memory)."""
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = math.prod(shapes[name]) * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    chunk = 1 << 26
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(shapes):
            left = math.prod(shapes[name])
            # norms and scales near 1, the rest small: activations stay finite through 60 blocks
            one = name.endswith(("norm.weight", "scale", "norm1.weight", "norm2.weight", "ln_1.weight"))
            while left:
                n = min(left, chunk)
                values = torch.randn(n, generator=generator) * 0.02 + (1.0 if one else 0.0)
                f.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                left -= n
    os.replace(tmp, path)


def ensure_files(cache: Path, only: set[str]) -> None:
    wanted = {"dit": ["diffusion_models/"], "llama": ["text_encoders/"], "sd": ["checkpoints/", "animatediff_models/"]}
    for rel, entries in FILES.items():
        if not any(rel.startswith(p) for key in only for p in wanted[key]):
            continue
        path = cache / rel
        if not path.exists():
            start = time.monotonic()
            write_random_safetensors(path, _shapes(entries))
            print(f"wrote {rel} ({path.stat().st_size / 1e9:.1f} GB) in {time.monotonic() - start:.0f}s", flush=True)
    if "llama" in only:
        from kineflow.training.tiny_models import write_word_tokenizer

        write_word_tokenizer(cache / "text_encoders" / "llava_llama3_tokenizer", [PROMPT])


PROMPT = "A cat walks on the grass, realistic style, golden hour light."

CHILD = r"""
import json, resource, sys, time, torch
from kineflow.runtime import host, generation
kind, policy, cache, budget = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
host.configure(models_dir=cache, memory_budget=budget)
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
read0 = rchar()
with host.quiet():
    if kind == "dit":
        from kineflow.runtime.video_models import load_video_model
        model = load_video_model("hunyuan_video_t2v_720p_bf16.safetensors", offload=policy)
        g = torch.Generator().manual_seed(0)
        text = {"text_states": torch.randn(1, 32, 4096, generator=g), "text_mask": torch.ones(1, 32, dtype=torch.long),
                "text_states_2": torch.randn(1, 768, generator=g)}
        latent = generation.empty_latent("hunyuan_video", 256, 256, 5, 1)
        run = lambda: generation.sample_video(model, {"positive": text, "negative": None}, latent, seed=0, steps=1,
                                              cfg=1.0, shift=7.0, embedded_guidance=6.0, sampler_name="euler")
    elif kind == "llama":
        from kineflow.runtime.video_models import load_text_encoders
        te = load_text_encoders("llava_llama3_bf16.safetensors", "clip_l.safetensors", "llava_llama3_tokenizer",
                                offload=policy)
        run = lambda: generation.encode_prompts(te, sys.argv[5], "")
    else:
        from kineflow.runtime.animatediff import apply_motion_module, load_motion_module, load_sd_checkpoint
        unet, vae, clip = load_sd_checkpoint("v1-5-pruned-emaonly.safetensors", offload=policy)
        model = apply_motion_module(unet, load_motion_module("mm_sd_v15_v2.safetensors", offload=policy))
        g = torch.Generator().manual_seed(0)
        cond = {"positive": {"context": torch.randn(1, 77, 768, generator=g)}, "negative": None}
        latent = generation.empty_latent("sd15", 256, 256, 16, 1)
        run = lambda: generation.sample_video(model, cond, latent, seed=0, steps=1, cfg=1.0, shift=1.0,
                                              embedded_guidance=1.0, sampler_name="euler")
    read_load = rchar() - read0
    run()  # the first pass also learns the order in which blocks run (fetching ahead starts with the second)
    start = time.monotonic()
    read_first = rchar()
    run()
    seconds = time.monotonic() - start
print(json.dumps({"kind": kind, "policy": policy, "seconds": seconds, "peak_gib": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 2**20, "read_load_gb": read_load / 1e9, "read_run_gb": (rchar() - read_first) / 1e9}))
"""

RUNS = {"dit": ["blocks", "sequential"], "llama": ["blocks", "sequential"], "sd": ["full", "blocks"]}


def measure(kind: str, policy: str, cache: Path, budget: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, policy, str(cache), budget, PROMPT],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"kind": kind, "policy": policy, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"folder for the files (default {DEFAULT_CACHE})")
    parser.add_argument("--budget-gib", default="4", help="memory budget handed to the offloader (default 4)")
    parser.add_argument("--only", default="dit,llama,sd", help="comma-separated: dit, llama, sd")
    parser.add_argument("--delete", action="store_true", help="delete the cached files and exit")
    args = parser.parse_args()
    if args.delete:
        shutil.rmtree(args.cache, ignore_errors=True)
        print(f"deleted {args.cache}")
        return
    only = set(args.only.split(","))
    ensure_files(args.cache, only)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; budget {args.budget_gib} GiB; fp32 compute")
    print(f"{'model':<6} {'policy':<11} {'s/step':>8} {'peak RSS':>10} {'GB read (load / run)':>22}")
    for kind in ("dit", "llama", "sd"):
        if kind not in only:
            continue
        for policy in RUNS[kind]:
            r = measure(kind, policy, args.cache, args.budget_gib)
            if "error" in r:
                print(f"{kind:<6} {policy:<11} failed: {r['error']}")
                continue
            print(f"{kind:<6} {policy:<11} {r['seconds']:8.1f} {r['peak_gib']:7.2f} GiB "
                  f"{r['read_load_gb']:10.1f} / {r['read_run_gb']:.1f}", flush=True)


if __name__ == "__main__":
    main()
