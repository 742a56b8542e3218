"""HunyuanVideo DiT forward on the CPU: KineFlow vs diffusers, same weights and inputs, fp32.

    python benchmarks/bench_hunyuan_dit.py [--runs 5] [--profile]
    python benchmarks/bench_hunyuan_dit.py --compile [--runs 5] [--threads N]

Prints, per scenario, the median time of each implementation, the median per-round ratio diffusers/KineFlow
(runs alternate, so both see the same machine load), and KineFlow's achieved GFLOP/s (matmul + attention
FLOPs counted analytically) against a large square fp32 matmul timed in the same process.
Scenario "full text": every text token is real. Scenario "padded text": the prompt is right-padded to 256
tokens as the HunyuanVideo pipelines do; KineFlow drops the padding exactly, diffusers masks it.

`--compile` instead times KineFlow eager against KineFlow with its blocks compiled by torch.compile (inductor, the
loaders' `compile` option) on the "full text" scenario: the first compiled forward with an empty compile cache and
with the cache that run filled (as a later process finds it), then eager and compiled forwards alternately: wall
and process CPU time, median and best of each, and the speed-ups (median of the per-run ratios, ratio of the bests).
On a machine shared with other jobs both clocks swing with their load: the median of the per-run ratios is the
figure to quote.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT, HunyuanVideoDiTConfig, convert_state_dict

CONFIG = HunyuanVideoDiTConfig(
    hidden_size=512, heads_num=4, mm_double_blocks_depth=2, mm_single_blocks_depth=4, refiner_depth=2,
    rope_dim_list=(16, 56, 56), text_states_dim=1024, text_states_dim_2=256,
)
LATENT = (1, 16, 4, 48, 44)  # -> 4 x 24 x 22 = 2112 video tokens


def build_models():
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = CONFIG
    torch.manual_seed(0)
    ref = HunyuanVideoTransformer3DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.heads_num,
        attention_head_dim=cfg.head_dim, num_layers=cfg.mm_double_blocks_depth,
        num_single_layers=cfg.mm_single_blocks_depth, num_refiner_layers=cfg.refiner_depth,
        mlp_ratio=cfg.mlp_width_ratio, patch_size=cfg.patch_size[1], patch_size_t=cfg.patch_size[0],
        guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_states_dim,
        pooled_projection_dim=cfg.text_states_dim_2, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dim_list,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    ours = HunyuanVideoDiT(cfg).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), "diffusers"), strict=True)
    return ref, ours


def make_inputs(text_len: int, valid_len: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*LATENT, generator=g)
    text = torch.randn(1, text_len, CONFIG.text_states_dim, generator=g)
    mask = torch.zeros(1, text_len, dtype=torch.long)
    mask[:, :valid_len] = 1
    pooled = torch.randn(1, CONFIG.text_states_dim_2, generator=g)
    return x, torch.tensor([700.0]), text, mask, pooled, torch.tensor([6000.0])


def forward_flops(n_img: int, n_txt: int) -> float:
    """Matmul + attention FLOPs (2 per multiply-add) of one forward with n_txt text tokens actually processed."""
    cfg = CONFIG
    h, m, d_txt = cfg.hidden_size, cfg.mlp_hidden, cfg.text_states_dim
    n = n_img + n_txt
    attention = lambda length: 4 * length * length * h  # QK^T and PV  # noqa: E731
    refiner = cfg.refiner_depth * (2 * n_txt * (4 * h * h + 2 * h * m) + attention(n_txt))
    refiner += 2 * n_txt * d_txt * h  # input_embedder
    double = cfg.mm_double_blocks_depth * (2 * n * (4 * h * h + 2 * h * m) + attention(n))
    single = cfg.mm_single_blocks_depth * (2 * n * (h * (3 * h + m) + (h + m) * h) + attention(n))
    patch = 2 * n_img * h * (cfg.in_channels * 4) * 2  # img_in and final_layer.linear
    return float(refiner + double + single + patch)


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fn_a, fn_b, runs: int) -> tuple[float, float, float]:
    """Alternate a and b so both see the same machine load; return median(a), median(b), median(a/b)."""
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(runs):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times_a, times_b)]
    return statistics.median(times_a), statistics.median(times_b), statistics.median(ratios)


def matmul_peak_gflops(size: int = 2048, runs: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: a @ b, runs, warmup=2) / 1e9


def bench_compile(runs: int) -> None:
    """Eager vs regionally compiled KineFlow (runtime/acceleration.py), same weights and inputs."""
    from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT
    from kineflow.runtime.acceleration import compile_blocks

    # An empty compile cache, as on a user's first run (the cache is kept in a temporary folder and removed).
    cache = tempfile.TemporaryDirectory(prefix="kineflow-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    torch.manual_seed(0)
    eager = HunyuanVideoDiT(CONFIG).eval()
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0.0, 0.02)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, None)
    x, t, text, mask, pooled, guidance = make_inputs(128, 128)
    with torch.inference_mode():
        forward_eager = lambda: eager(x, t, text, mask, pooled, guidance)  # noqa: E731
        forward_compiled = lambda: compiled(x, t, text, mask, pooled, guidance)  # noqa: E731
        start = time.perf_counter()
        out = forward_compiled()
        first_cold = time.perf_counter() - start
        torch._dynamo.reset()  # forget the compiled code; the on-disk cache stays, as for a later process
        start = time.perf_counter()
        forward_compiled()
        first_warm = time.perf_counter() - start
        max_err = (out - forward_eager()).abs().max().item()
        forward_eager(), forward_compiled()  # warm-up
        rounds = [(_wall_and_cpu(forward_eager), _wall_and_cpu(forward_compiled)) for _ in range(runs)]
    cache.cleanup()
    n_img = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    print(f"HunyuanVideo DiT, CPU fp32, {torch.get_num_threads()} threads, hidden {CONFIG.hidden_size}, "
          f"{CONFIG.mm_double_blocks_depth}+{CONFIG.mm_single_blocks_depth} blocks, {n_img} video tokens + 128 text; "
          f"torch {torch.__version__}; {runs} alternating runs")
    print(f"first compiled forward: {first_cold:.1f} s with an empty compile cache, {first_warm:.1f} s with a "
          f"filled one; max|diff| to eager {max_err:.1e}")
    for clock, name in ((0, "wall"), (1, "CPU ")):
        eager_s = [e[clock] for e, _ in rounds]
        compiled_s = [c[clock] for _, c in rounds]
        ratio = statistics.median(e / c for e, c in zip(eager_s, compiled_s))
        print(f"{name} eager median {statistics.median(eager_s):.3f} s best {min(eager_s):.3f} s | compiled median "
              f"{statistics.median(compiled_s):.3f} s best {min(compiled_s):.3f} s | speed-up {ratio:.2f}x (median "
              f"ratio), {min(eager_s) / min(compiled_s):.2f}x (bests)")


def _wall_and_cpu(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of KineFlow's forward")
    parser.add_argument("--compile", action="store_true", help="KineFlow eager vs compiled blocks (no diffusers)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        bench_compile(args.runs)
        return

    ref, ours = build_models()
    n_img = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    scenarios = [("full text", 128, 128), ("padded text", 256, 64)]
    rows = []
    peak_before = matmul_peak_gflops()
    with torch.inference_mode():
        for name, text_len, valid in scenarios:
            x, t, text, mask, pooled, guidance = make_inputs(text_len, valid)
            ours_out = ours(x, t, text, mask, pooled, guidance)
            ref_out = ref(x, t, text, mask, pooled, guidance, return_dict=False)[0]
            max_err = (ours_out - ref_out).abs().max().item()
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    ours(x, t, text, mask, pooled, guidance)
                print(f"--- KineFlow profile, {name}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            t_ref, t_ours, ratio = interleaved_medians(
                lambda: ref(x, t, text, mask, pooled, guidance, return_dict=False),
                lambda: ours(x, t, text, mask, pooled, guidance),
                args.runs,
            )
            gflops = forward_flops(n_img, valid) / t_ours / 1e9
            rows.append((name, text_len, valid, t_ref, t_ours, ratio, gflops, max_err))
    peak = max(peak_before, matmul_peak_gflops())  # the machine is shared: keep the best of two measurements

    print(f"HunyuanVideo DiT, CPU fp32, {torch.get_num_threads()} threads, hidden {CONFIG.hidden_size}, "
          f"{CONFIG.heads_num} heads, {CONFIG.mm_double_blocks_depth}+{CONFIG.mm_single_blocks_depth} blocks, "
          f"{n_img} video tokens; median of {args.runs}")
    print(f"matmul peak (2048^2 fp32, best of two measurements): {peak:.1f} GFLOP/s")
    header = ("scenario", "text", "diffusers s", "KineFlow s", "ratio", "GFLOP/s", "of peak", "max|diff|")
    print("{:<12} {:>8} {:>12} {:>11} {:>6} {:>8} {:>8} {:>10}".format(*header))
    for name, text_len, valid, t_ref, t_ours, ratio, gflops, err in rows:
        print(f"{name:<12} {valid:>3}/{text_len:<4} {t_ref:>12.3f} {t_ours:>11.3f} {ratio:>6.2f} "
              f"{gflops:>8.1f} {gflops / peak:>8.0%} {err:>10.2e}")


if __name__ == "__main__":
    main()
