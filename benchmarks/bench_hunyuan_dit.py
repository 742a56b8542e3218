"""HunyuanVideo DiT forward on the CPU: KineFlow vs diffusers (and ComfyUI's own model), same weights and inputs,
in fp32 and bf16.

    python benchmarks/bench_hunyuan_dit.py [--runs 5] [--dtypes fp32 bf16] [--comfyui DIR] [--profile]
    python benchmarks/bench_hunyuan_dit.py --compile [--runs 5] [--threads N]

Prints, per dtype and scenario, the median time of each implementation, the median per-round ratio of each peer's
time to KineFlow's (runs alternate, so all see the same machine load), and each implementation's achieved GFLOP/s
(matmul + attention FLOPs of the real tokens, counted analytically) as a share of the peak of a large square matmul
*of the same dtype* timed in the same process (best of a measurement before and one after). The CPU, whether it
multiplies bf16 natively (AMX / AVX-512 BF16; without, bf16 kernels convert around fp32 ones and bf16 times say
little), and the threads are named in the header. Targets on a CPU with native bf16: KineFlow >= 1.25x diffusers'
speed in fp32 and >= 1.3x in bf16.
Scenario "full text": every text token is real. Scenario "padded text": the prompt is right-padded to 256
tokens as the HunyuanVideo pipelines do; KineFlow drops the padding exactly, diffusers and ComfyUI mask it.
Every implementation gets the same inputs in the compute dtype (as their pipelines cast them). KineFlow attends
with the backend its loaders pick by default (`auto`: models/attention.py's bf16 query tiles on a CPU with native
bf16 matmul, else torch's fused kernel).

`--comfyui DIR` adds ComfyUI's HunyuanVideo model (comfy/ldm/hunyuan_video/model.py of the ComfyUI source tree DIR),
imported into this process as ComfyUI runs it with `--cpu` (its operations, its CPU attention choice), with the
same weights renamed to its keys.

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
import sys
import tempfile
import time
from pathlib import Path

import torch

from kineflow.models.hunyuan_video_dit import HunyuanVideoDiT, HunyuanVideoDiTConfig, convert_state_dict
from kineflow.runtime import acceleration

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


def matmul_peak_gflops(size: int = 2048, runs: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, runs, warmup=2) / 1e9


def interleaved_rounds(fns: dict, runs: int) -> dict[str, list[float]]:
    """Call every fn once per round, in turn, after one warm-up round; each fn's times."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def comfyui_model(tree: str, ours: HunyuanVideoDiT, dtype: torch.dtype):
    """ComfyUI's HunyuanVideo model from the source tree `tree`, as `python main.py --cpu` builds it, holding ours'
    weights (ComfyUI's key names are a renaming of the internal ones: convert_state_dict(..., "comfy")), and the name
    of the attention function ComfyUI chose."""
    tree = Path(tree).resolve()
    if not (tree / "comfy" / "ldm" / "hunyuan_video" / "model.py").is_file():
        raise SystemExit(f"--comfyui {tree}: not a ComfyUI source tree (no comfy/ldm/hunyuan_video/model.py)")
    sys.path.insert(0, str(tree))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as `main.py --cpu`: model_management reads it when imported
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.modules.attention import optimized_attention

    cfg = CONFIG
    model = HunyuanVideo(
        image_model="hunyuan_video", dtype=dtype, device="cpu", operations=comfy.ops.disable_weight_init,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, vec_in_dim=cfg.text_states_dim_2,
        context_in_dim=cfg.text_states_dim, hidden_size=cfg.hidden_size, mlp_ratio=cfg.mlp_width_ratio,
        num_heads=cfg.heads_num, depth=cfg.mm_double_blocks_depth, depth_single_blocks=cfg.mm_single_blocks_depth,
        axes_dim=list(cfg.rope_dim_list), theta=cfg.rope_theta, patch_size=list(cfg.patch_size), qkv_bias=True,
        guidance_embed=cfg.guidance_embed, byt5=False, meanflow=False, use_cond_type_embedding=False,
        vision_in_dim=None, meanflow_sum=False,
    ).eval()
    theirs = model.state_dict()
    internal_of = convert_state_dict({key: key for key in theirs}, "comfy")  # internal key -> ComfyUI key
    ours_sd = ours.state_dict()
    missing = sorted(set(internal_of) ^ set(ours_sd))
    if missing:
        raise SystemExit(f"ComfyUI's HunyuanVideo keys do not map onto KineFlow's: {missing[:5]}")
    model.load_state_dict({internal_of[k]: v for k, v in ours_sd.items()}, strict=True)
    return model, getattr(optimized_attention, "__name__", str(optimized_attention))


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


def forwards(ref, ours, comfy, inputs, dtype) -> dict:
    """One forward per implementation on the same inputs, cast to the compute dtype as each pipeline does."""
    x, t, text, mask, pooled, guidance = inputs
    x, text, pooled = x.to(dtype), text.to(dtype), pooled.to(dtype)
    impls = {"diffusers": lambda: ref(x, t, text, mask, pooled, guidance, return_dict=False)[0]}
    if comfy is not None:  # ComfyUI embeds guidance x 1000 itself; its timestep is on the 0..1000 scale, like ours
        impls["ComfyUI"] = lambda: comfy(x, t, text, y=pooled, guidance=guidance / 1000.0, attention_mask=mask)
    impls["KineFlow"] = lambda: ours(x, t, text, mask, pooled, guidance)
    return impls


def cpu_header() -> str:
    from kineflow.runtime import cpu

    native = cpu.native_bf16()
    return (f"{cpu.cpu_name()}, {torch.get_num_threads()} threads, native bf16 matmul: "
            f"{native or 'no (bf16 kernels convert around fp32 ones)'}; torch {torch.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--comfyui", metavar="DIR", help="ComfyUI source tree: add its own HunyuanVideo model")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of KineFlow's forward")
    parser.add_argument("--compile", action="store_true", help="KineFlow eager vs compiled blocks (no diffusers)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        bench_compile(args.runs)
        return

    ref32, ours32 = build_models()
    n_img = LATENT[2] * (LATENT[3] // 2) * (LATENT[4] // 2)
    scenarios = [("full text", 128, 128), ("padded text", 256, 64)]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows, peaks, attention_name = [], {}, None
    for dtype_name in args.dtypes:
        dtype = dtypes[dtype_name]
        ref = copy.deepcopy(ref32).to(dtype) if dtype != torch.float32 else ref32
        ours = copy.deepcopy(ours32).to(dtype) if dtype != torch.float32 else ours32
        # the attention backend a loader gives it: 'auto' (bf16 query tiles on a CPU with native bf16 matmul)
        acceleration.apply(ours, None, acceleration.resolve_attention("auto", torch.device("cpu")))
        if args.comfyui:
            comfy, attention_name = comfyui_model(args.comfyui, ours, dtype)
        peak_before = matmul_peak_gflops(dtype=dtype)
        with torch.inference_mode():
            for name, text_len, valid in scenarios:
                impls = forwards(ref, ours, comfy if args.comfyui else None, make_inputs(text_len, valid), dtype)
                outputs = {impl: fn().float() for impl, fn in impls.items()}
                errors = {impl: (out - outputs["diffusers"]).abs().max().item() for impl, out in outputs.items()
                          if impl != "diffusers"}
                if args.profile:
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        impls["KineFlow"]()
                    print(f"--- KineFlow profile, {dtype_name}, {name}")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
                times = interleaved_rounds(impls, args.runs)
                rows.append((dtype_name, name, text_len, valid, times, forward_flops(n_img, valid), errors))
        peaks[dtype_name] = max(peak_before, matmul_peak_gflops(dtype=dtype))  # shared machine: best of two

    print(f"HunyuanVideo DiT forward on the CPU: {cpu_header()}")
    print(f"hidden {CONFIG.hidden_size}, {CONFIG.heads_num} heads, {CONFIG.mm_double_blocks_depth}+"
          f"{CONFIG.mm_single_blocks_depth} blocks, {n_img} video tokens; median of {args.runs} interleaved rounds"
          + (f"; ComfyUI from {args.comfyui}, attention {attention_name}" if args.comfyui else ""))
    print("matmul peak (2048^2, best of two measurements): "
          + ", ".join(f"{name} {peak:.1f} GFLOP/s" for name, peak in peaks.items()))
    for dtype_name, name, text_len, valid, times, flops, errors in rows:
        medians = {impl: statistics.median(ts) for impl, ts in times.items()}
        parts = []
        for impl, seconds in medians.items():
            share = flops / seconds / 1e9 / peaks[dtype_name]  # the useful work: padding counts for nobody
            slower = statistics.median(a / b for a, b in zip(times[impl], times["KineFlow"]))
            ratio = "" if impl == "KineFlow" else f", {slower:.2f}x KineFlow's time"
            diff = f", max|diff| {errors[impl]:.1e}" if impl in errors else ""
            parts.append(f"{impl} {seconds:.3f} s ({share:.0%} of peak{ratio}{diff})")
        print(f"{dtype_name} {name:<11} text {valid:>3}/{text_len:<3}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
