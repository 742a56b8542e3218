"""Full-size models on a CPU within a memory budget: peak resident memory and seconds per step per offload policy.

Writes random-weight checkpoints with the real full-size key sets and shapes (tests/data/checkpoints) once into a
cache folder outside the repository (about 37 GB: check `df -h` first; `--delete` removes them), then runs each
measurement in a fresh process:

- the HunyuanVideo transformer (12.8 B parameters, ComfyUI layout, a bf16 file of 25.6 GB): one sampler step of a
  256x256, 5-frame video with 32 text tokens, under `blocks` and `sequential`;
- the LLaVA-LLaMA-3-8B text encoder (a scaled-fp8 file of 8 GB, as ComfyUI distributes it) + CLIP-L: one prompt
  and the empty negative prompt, under `blocks` and `sequential`;
- SD1.5 (an LDM checkpoint) + the v2 motion module: one step of 16 frames at 256x256, under `full` and `blocks`;
- a mid-size transformer (0.3 B parameters) as bf16 .safetensors and as GGUF Q8_0 / Q4_K: the same step, all
  resident (the GGUF linears stay quantized in memory and expand per layer).

Each measurement runs the step twice (the first pass learns the order in which blocks run; fetching ahead
starts with the second) and reports: the peak resident set size of the process over both (VmHWM of the
child's own image; ru_maxrss would include the parent's memory at fork; weights are read with pread, no file
stays mapped), the seconds of the second step, and the GB read from files
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
    "text_encoders/llava_llama3_fp8_scaled.safetensors": [("llava_llama3_8b_text_hf", "")],
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


def _fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Which tensors a scaled-fp8 file (as ComfyUI distributes LLaMA) stores in fp8: the linear layers' weights."""
    return len(shape) == 2 and name.endswith(".weight") and "embed" not in name


def write_random_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    """A .safetensors file streamed tensor by tensor (never more than one chunk in memory): bf16, or for a name
    containing fp8_scaled ComfyUI's scaled fp8 (fp8 linear weights, a scale_weight each, a scaled_fp8 marker)."""
    scaled = "fp8_scaled" in path.name
    header, offset = {}, 0
    entries = {n: ("F8_E4M3" if scaled and _fp8_weight(n, shape) else "BF16", shape) for n, shape in shapes.items()}
    if scaled:
        entries.update({n.removesuffix(".weight") + ".scale_weight": ("F32", ()) for n, (d, _) in list(entries.items())
                        if d == "F8_E4M3"})
        entries["scaled_fp8"] = ("F8_E4M3", (0,))
    for name in sorted(entries):
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * {"BF16": 2, "F8_E4M3": 1, "F32": 4}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    chunk = 1 << 26
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in sorted(entries):
            dtype, shape = entries[name]
            left = math.prod(shape)
            if dtype == "F32":  # a scale: fp8 values of about 1 times 0.02
                f.write(torch.tensor(0.02, dtype=torch.float32).numpy().tobytes())
                continue
            # norms and scales near 1, the rest small: activations stay finite through 60 blocks
            one = name.endswith(("norm.weight", "scale", "norm1.weight", "norm2.weight", "ln_1.weight"))
            while left:
                n = min(left, chunk)
                values = torch.randn(n, generator=generator)
                if dtype == "F8_E4M3":
                    f.write(values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes())
                else:
                    values = values * 0.02 + (1.0 if one else 0.0)
                    f.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                left -= n
    os.replace(tmp, path)


def ensure_files(cache: Path, only: set[str]) -> None:
    wanted = {"dit": ["diffusion_models/"], "llama": ["text_encoders/"], "sd": ["checkpoints/", "animatediff_models/"]}
    for rel, entries in FILES.items():
        if not any(rel.startswith(p) for key in only for p in wanted.get(key, [])):
            continue
        path = cache / rel
        if not path.exists():
            start = time.monotonic()
            write_random_safetensors(path, _shapes(entries))
            print(f"wrote {rel} ({path.stat().st_size / 1e9:.1f} GB) in {time.monotonic() - start:.0f}s", flush=True)
    if "llama" in only:
        from kineflow.training.tiny_models import write_word_tokenizer

        write_word_tokenizer(cache / "text_encoders" / "llava_llama3_tokenizer", [PROMPT])


MID_FILES = ("mid_dit_bf16.safetensors", "mid_dit_Q8_0.gguf", "mid_dit_Q4_K.gguf")


def ensure_mid_size_files(cache: Path) -> None:
    """A mid-size HunyuanVideo transformer (hidden 1024, 4 double + 8 single blocks, real text widths; 0.3 B
    parameters) in ComfyUI's key names: a bf16 .safetensors file and GGUF Q8_0 / Q4_K files as ComfyUI-GGUF
    writes them (Q8_0 quantized by the gguf package; Q4_K from random blocks with small scales, which costs the
    same to store and to expand)."""
    import gguf
    from safetensors.torch import save_file

    from kineflow.models import hunyuan_video_dit as dit_mod
    from kineflow.training.tiny_models import comfy_dit_names, write_gguf

    folder = cache / "diffusion_models"
    if all((folder / name).exists() for name in MID_FILES):
        return
    folder.mkdir(parents=True, exist_ok=True)
    config = dit_mod.HunyuanVideoDiTConfig(hidden_size=1024, heads_num=8, mm_double_blocks_depth=4,
                                           mm_single_blocks_depth=8)
    torch.manual_seed(0)
    model = dit_mod.HunyuanVideoDiT(config)
    sd = comfy_dit_names({k: (v * 0.5 if v.ndim > 1 else v).to(torch.bfloat16) for k, v in model.state_dict().items()})
    save_file(sd, str(folder / MID_FILES[0]))
    for name, qtype in zip(MID_FILES[1:], (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K)):
        write_gguf(folder / name, sd, qtype)
    print(f"wrote the mid-size transformer files ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")


PROMPT = "A cat walks on the grass, realistic style, golden hour light."

CHILD = r"""
import json, sys, time, torch
from kineflow.runtime import host, generation
kind, policy, cache, budget = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
host.configure(models_dir=cache, memory_budget=budget)
def rchar():
    return int(dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())["rchar"])
read0 = rchar()
with host.quiet():
    if kind in ("dit", "gguf"):
        from kineflow.runtime.video_models import load_video_model
        model = load_video_model("hunyuan_video_t2v_720p_bf16.safetensors" if kind == "dit" else policy,
                                 offload=policy if kind == "dit" else "full")
        g = torch.Generator().manual_seed(0)
        text = {"text_states": torch.randn(1, 32, 4096, generator=g), "text_mask": torch.ones(1, 32, dtype=torch.long),
                "text_states_2": torch.randn(1, 768, generator=g)}
        latent = generation.empty_latent("hunyuan_video", 256, 256, 5, 1)
        run = lambda: generation.sample_video(model, {"positive": text, "negative": None}, latent, seed=0, steps=1,
                                              cfg=1.0, shift=7.0, embedded_guidance=6.0, sampler_name="euler")
    elif kind == "llama":
        from kineflow.runtime.video_models import load_text_encoders
        te = load_text_encoders("llava_llama3_fp8_scaled.safetensors", "clip_l.safetensors", "llava_llama3_tokenizer",
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
hwm_kib = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
print(json.dumps({"kind": kind, "policy": policy, "seconds": seconds, "peak_gib": hwm_kib / 2**20, "read_load_gb": read_load / 1e9, "read_run_gb": (rchar() - read_first) / 1e9}))
"""

RUNS = {"dit": ["blocks", "sequential"], "llama": ["blocks", "sequential"], "sd": ["full", "blocks"],
        "gguf": list(MID_FILES)}  # for gguf the "policy" column names the file (offload full)


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
    parser.add_argument("--only", default="dit,llama,sd,gguf", help="comma-separated: dit, llama, sd, gguf")
    parser.add_argument("--delete", action="store_true", help="delete the cached files and exit")
    args = parser.parse_args()
    if args.delete:
        shutil.rmtree(args.cache, ignore_errors=True)
        print(f"deleted {args.cache}")
        return
    only = set(args.only.split(","))
    ensure_files(args.cache, only)
    if "gguf" in only:
        ensure_mid_size_files(args.cache)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; budget {args.budget_gib} GiB; fp32 compute")
    print(f"{'model':<6} {'policy (gguf: file)':<26} {'s/step':>8} {'peak RSS':>10} {'GB read (load / run)':>22}")
    for kind in ("dit", "llama", "sd", "gguf"):
        if kind not in only:
            continue
        for policy in RUNS[kind]:
            r = measure(kind, policy, args.cache, args.budget_gib)
            if "error" in r:
                print(f"{kind:<6} {policy:<26} failed: {r['error']}")
                continue
            print(f"{kind:<6} {policy:<26} {r['seconds']:8.1f} {r['peak_gib']:7.2f} GiB "
                  f"{r['read_load_gb']:10.1f} / {r['read_run_gb']:.1f}", flush=True)


if __name__ == "__main__":
    main()
