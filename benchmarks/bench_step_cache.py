"""Step caching (the Step Cache node) against uncached sampling on the shipped tiny models: model evaluations,
sampling time and prompt adherence per threshold.

For each family (HunyuanVideo at 30 steps, AnimateDiff at 20; otherwise the shipped workflows' settings, as
`kineflow eval`) and each of `kineflow eval`'s held-out prompts, the script samples uncached and at every threshold,
interleaved (the order of the runs rotates from prompt to prompt, so load from other jobs on a shared machine falls
on all of them alike), decodes, and scores each video with the analytic judge. Per threshold it prints the full
model evaluations per run (calls in which the transformer's or UNet's last block ran; a skipped call still runs the
model's first block, or TeaCache's probe) and how many times fewer they are than uncached, how many times faster
sampling is (the median over prompts of the uncached run's sampling time over the cached run's, which ran next to
it), and colour / shape / direction adherence with their difference from uncached in points. The evaluation ratio
is the same on every machine; the time ratio depends on the CPU and its load.

    python benchmarks/bench_step_cache.py [--family hunyuan_video|animatediff|both] [-n 60]
                                          [--thresholds T ...] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import replace

import torch
from torch import nn

from kineflow.runtime import evaluation, generation, host
from kineflow.runtime.cpu import cpu_name
from kineflow.samplers import DEFAULT_STEP_CACHE_THRESHOLD
from kineflow.samplers.step_cache import StepCacheOptions
from kineflow.shapes.dataset import frames_to_render
from kineflow.shapes.judge import judge, score
from kineflow.shapes.prompts import expected_from_spec, heldout_prompts

STEPS = {"hunyuan_video": 30, "animatediff": 20}
SCORED = ("colour", "shape", "direction")


def load(family: str) -> tuple[evaluation.EvalModels, nn.Module, nn.Module]:
    """The shipped tiny models, the network whose calls are counted and the last block of a full evaluation."""
    if family == "hunyuan_video":
        models = evaluation.load_hunyuan_video()
        net = models.net.net
    else:
        models = evaluation.load_animatediff()
        net = models.net.unet
    last = net.offload_blocks()[-1]
    return models, net, last[0] if isinstance(last, nn.ModuleList) else last


@contextlib.contextmanager
def counting(net: nn.Module, last_block: nn.Module):
    """Yields [calls, full evaluations] of `net` inside."""
    counts = [0, 0]
    hooks = [net.register_forward_pre_hook(lambda module, args: counts.__setitem__(0, counts[0] + 1)),
             last_block.register_forward_hook(lambda module, args, out: counts.__setitem__(1, counts[1] + 1))]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def measure(family: str, thresholds: list[float], count: int) -> dict:
    settings = replace(evaluation.shipped_workflow_settings(family), steps=STEPS[family])
    models, net, last_block = load(family)
    pairs = heldout_prompts(count, settings.seed, frames=frames_to_render(settings.frames), height=settings.height,
                            width=settings.width)
    configs = [None, *thresholds]
    results = {c: {"verdicts": [], "seconds": [], "calls": 0, "full": 0} for c in configs}
    bar = host.progress(count, f"{family}: {len(configs)} runs a prompt")
    for i, (prompt, _spec) in enumerate(pairs):
        with host.quiet():
            cond = generation.encode_prompts(models.text, prompt, "")
        latent = generation.empty_latent(models.net.latent_format.name, settings.width, settings.height,
                                         settings.frames, 1)
        for threshold in configs[i % len(configs):] + configs[:i % len(configs)]:
            result = results[threshold]
            cache = None if threshold is None else StepCacheOptions(threshold)
            with host.quiet(), counting(net, last_block) as counts:
                began = time.perf_counter()
                sampled = generation.sample_video(
                    models.net, cond, latent, seed=settings.seed + i, steps=settings.steps, cfg=settings.cfg,
                    shift=settings.shift, embedded_guidance=1.0, sampler_name=settings.sampler_name,
                    scheduler=settings.scheduler, step_cache=cache)
                result["seconds"].append(time.perf_counter() - began)
                frames = generation.decode_video(models.vae, sampled, tiling=None)
            result["calls"] += counts[0]
            result["full"] += counts[1]
            result["verdicts"].append(judge(frames))
        bar.update(1)
    expected = [expected_from_spec(spec) for _, spec in pairs]
    for result in results.values():
        scores = score(result.pop("verdicts"), expected)
        result["accuracy"] = {a: scores[a].accuracy for a in SCORED}
    return {"settings": settings, "results": results}


def table(family: str, measured: dict, count: int) -> str:
    settings, results = measured["settings"], measured["results"]
    base = results[None]
    lines = [f"{family}: {evaluation.describe_settings(settings, family == 'hunyuan_video')}, {count} held-out prompts",
             f"{'threshold':>9} {'full evals/run':>14} {'fewer evals':>11} {'sampling':>9}  "
             + "  ".join(f"{a:>13}" for a in SCORED)]
    for threshold, r in results.items():
        label = "uncached" if threshold is None else f"{threshold:g}"
        adherence = "  ".join(f"{r['accuracy'][a]:6.1%} ({100 * (r['accuracy'][a] - base['accuracy'][a]):+4.1f})"
                              for a in SCORED)
        speedup = statistics.median(a / b for a, b in zip(base["seconds"], r["seconds"]))
        lines.append(f"{label:>9} {r['full'] / count:14.1f} {base['full'] / r['full']:10.2f}x "
                     f"{speedup:8.2f}x  {adherence}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("hunyuan_video", "animatediff", "both"), default="both")
    parser.add_argument("-n", "--count", type=int, default=60, help="held-out prompts (default 60)")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        default=sorted({0.05, 0.1, 0.15, 0.2, DEFAULT_STEP_CACHE_THRESHOLD}),
                        help="Step Cache thresholds to compare with uncached sampling")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    families = ("hunyuan_video", "animatediff") if args.family == "both" else (args.family,)
    print(f"CPU: {cpu_name()}, {args.threads} torch threads; torch {torch.__version__}; default threshold "
          f"{DEFAULT_STEP_CACHE_THRESHOLD:g}")
    for family in families:
        print(table(family, measure(family, args.thresholds, args.count), args.count), flush=True)


if __name__ == "__main__":
    main()
