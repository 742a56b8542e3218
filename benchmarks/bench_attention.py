"""bf16 attention on the CPU: the `tiled` backend against torch's fused kernel (sdpa), call by call.

    python benchmarks/bench_attention.py [--runs 5] [--threads N] [--long]

The calls are the shapes the pack's models make: the tiny shipped models, the DiT benchmark's
(benchmarks/bench_hunyuan_dit.py), full-size HunyuanVideo (24 heads of 128; video tokens + 256 text tokens) at a
few video sizes, and SD1.5 + motion module ones (spatial self- and cross-attention, the motion module's attention
over frames). `--long` adds full-size HunyuanVideo at 848x480, 25 frames (11,386 tokens; about a minute a round).
Rounds interleave the two kernels; the ratio is the median of the per-round ratios sdpa time / tiled time (above 1:
the tiles are faster), with the error of each against an fp32 reference and whether `auto` takes the tiles for
that call on this CPU and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kineflow.models import attention
from kineflow.runtime import cpu

# (label, batch, heads, query tokens, key tokens, head dim)
CALLS = [
    ("tiny DiT text refiner (2 x 20 tokens)", 2, 4, 20, 20, 32),
    ("tiny DiT joint (128x128, 9 frames)", 2, 4, 212, 212, 32),
    ("benchmark DiT joint (bench_hunyuan_dit.py)", 1, 4, 2240, 2240, 128),
    ("HunyuanVideo joint, 256x256, 17 frames", 1, 24, 1536, 1536, 128),
    ("HunyuanVideo joint, 512x320, 25 frames", 1, 24, 4736, 4736, 128),
    ("SD1.5 self, 256x256, 16 frames x 2", 32, 8, 1024, 1024, 40),
    ("SD1.5 cross, 256x256, 16 frames x 2", 32, 8, 1024, 77, 40),
    ("motion module, 256x256, 16 frames x 2", 2048, 8, 16, 16, 40),
]
LONG = [("HunyuanVideo joint, 848x480, 25 frames", 1, 24, 11386, 11386, 128)]


def time_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--long", action="store_true", help="add full-size HunyuanVideo at 848x480, 25 frames")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    native = cpu.native_bf16()
    print(f"bf16 attention on {cpu.cpu_name()}, {torch.get_num_threads()} threads, native bf16 matmul: "
          f"{native or 'no'}; torch {torch.__version__}; median of {args.runs} interleaved rounds")
    print(f"{'call':<46} {'B x heads x Lq x Lk x D':>26} {'sdpa ms':>9} {'tiled ms':>9} {'sdpa/tiled':>10} "
          f"{'err sdpa':>9} {'err tiled':>9} {'auto':>6}")
    generator = torch.Generator().manual_seed(0)
    for label, batch, heads, n_q, n_k, dim in CALLS + (LONG if args.long else []):
        # the models hand attention [B, L, heads, D] projections seen as [B, heads, L, D]
        q = torch.randn(batch, n_q, heads, dim, generator=generator).bfloat16().transpose(1, 2)
        k, v = (torch.randn(batch, n_k, heads, dim, generator=generator).bfloat16().transpose(1, 2) for _ in "kv")
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                   "tiled": lambda: attention.attend(q, k, v, None, "tiled")}
        errors = {name: (fn().float() - reference).abs().max().item() for name, fn in kernels.items()}
        del reference
        times = {name: [] for name in kernels}
        for _ in range(args.runs):
            for name, fn in kernels.items():
                times[name].append(time_once(fn))
        ratio = statistics.median(s / t for s, t in zip(times["sdpa"], times["tiled"]))
        auto = "tiled" if native and attention.tiles_pay(q, k) else "sdpa"
        shape = f"{batch} x {heads} x {n_q} x {n_k} x {dim}"
        print(f"{label:<46} {shape:>26} {statistics.median(times['sdpa']) * 1e3:>9.1f} "
              f"{statistics.median(times['tiled']) * 1e3:>9.1f} {ratio:>9.2f}x {errors['sdpa']:>9.1e} "
              f"{errors['tiled']:>9.1e} {auto:>6}")


if __name__ == "__main__":
    main()
