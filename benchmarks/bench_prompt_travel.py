"""Prompt travel adherence on the shipped tiny models: does a 2-keyframe schedule change the object's colour at the
keyframe?

For each case, a held-out prompt (`kineflow eval`'s set, one-shape clips) is paired with the same sentence naming
another object colour (not the background's): prompt 1 and prompt 2 differ in that one word. The schedule is
`"0": prompt 1, "K": prompt 2` (K = the middle frame by default), sampled with the family's shipped workflow
settings (as `kineflow eval`), decoded and judged by the analytic judge on two stretches of frames:

- before: the video frames of the latent frames whose prompt-1 weight is above 1/2 (the schedule interpolates
  linearly from frame 0 to K, so these lead up to the midpoint);
- after: the video frames from K on, of latent frames whose prompt-2 weight is above 1/2.

A case passes when the judged object colour is prompt 1's before and prompt 2's after (the issue's target: >= 80 %).
The baseline samples prompt 1 alone with the same seed and applies the same test (a model ignoring the schedule
scores about 0 %). Also printed: the share of cases whose "before" colour is right, and whose "after" colour is.

    python benchmarks/bench_prompt_travel.py [--family hunyuan_video|animatediff|both] [-n 30] [--keyframe K]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from kineflow.runtime import evaluation, generation, host
from kineflow.samplers.prompt_schedule import covered_frames, latent_frame_weights, parse_schedule
from kineflow.shapes.dataset import COLOURS, caption, frames_to_render, sample_spec
from kineflow.shapes.judge import judge


def colour_pairs(n: int, seed: int, frames: int, height: int, width: int) -> list[tuple[str, str, str, str]]:
    """n (prompt 1, colour 1, prompt 2, colour 2) on held-out one-shape specs; prompt 2 is prompt 1's sentence with
    the object's colour changed (the caption is drawn twice from the same generator state)."""
    rng = np.random.default_rng([seed, 104729])
    names = list(COLOURS)
    out, i = [], 0
    while len(out) < n:
        spec = sample_spec(rng, "heldout", frames=frames, height=height, width=width)
        i += 1
        if len(spec.shapes) != 1:
            continue
        shape = spec.shapes[0]
        choices = [c for c in names if c not in (shape.colour, spec.background)]
        other = choices[i % len(choices)]
        spec2 = dataclasses.replace(spec, shapes=(dataclasses.replace(shape, colour=other),))
        templates = "heldout" if i % 2 else "train"
        p1 = caption(spec, np.random.default_rng([seed, i]), templates)
        p2 = caption(spec2, np.random.default_rng([seed, i]), templates)
        out.append((p1, shape.colour, p2, other))
    return out


def stretches(keyframe: int, latent_frames: int, ratio: int) -> tuple[list[int], list[int]]:
    """The video frames judged "before" and "after" (see the module docstring)."""
    schedule = parse_schedule(json.dumps({"0": "a", str(keyframe): "b"})[1:-1])
    weights = latent_frame_weights(schedule, latent_frames, ratio)
    before = [f for t, row in enumerate(weights) if row[0] > 0.5 for f in covered_frames(t, ratio)]
    after = [f for t, row in enumerate(weights) if row[1] > 0.5 for f in covered_frames(t, ratio) if f >= keyframe]
    return before, after


def generate(models, conditioning, settings, seed) -> torch.Tensor:
    net = models.net
    latent = generation.empty_latent(net.latent_format.name, settings.width, settings.height, settings.frames, 1)
    with host.quiet():
        sampled = generation.sample_video(net, conditioning, latent, seed=seed, steps=settings.steps, cfg=settings.cfg,
                                          shift=settings.shift, embedded_guidance=1.0,
                                          sampler_name=settings.sampler_name, scheduler=settings.scheduler)
        return generation.decode_video(models.vae, sampled, tiling=None)


def run_family(family: str, n: int, keyframe: int | None, seed: int) -> dict:
    settings = evaluation.shipped_workflow_settings(family)
    models = evaluation.load_hunyuan_video() if family == "hunyuan_video" else evaluation.load_animatediff()
    fmt = models.net.latent_format
    latent_frames = fmt.latent_shape(1, settings.frames, settings.height, settings.width)[2]
    video_frames = fmt.video_frames(latent_frames)
    keyframe = keyframe if keyframe is not None else video_frames // 2
    before, after = stretches(keyframe, latent_frames, fmt.temporal_ratio)
    pairs = colour_pairs(n, seed, frames_to_render(settings.frames), settings.height, settings.width)
    tallies = {run: {"pass": 0, "before": 0, "after": 0} for run in ("travel", "baseline")}
    cases, start = [], time.perf_counter()
    for i, (p1, c1, p2, c2) in enumerate(pairs):
        schedule = f"{json.dumps('0')}: {json.dumps(p1)},\n{json.dumps(str(keyframe))}: {json.dumps(p2)}"
        runs = {"travel": generation.encode_schedule(models.text, schedule, ""),
                "baseline": generation.encode_prompts(models.text, p1, "")}
        case = {"prompt_1": p1, "prompt_2": p2}
        for run, conditioning in runs.items():
            clip = generate(models, conditioning, settings, seed + i)
            got = (judge(clip[before]).colour, judge(clip[after]).colour)
            ok = (got[0] == c1, got[1] == c2)
            tallies[run]["before"] += ok[0]
            tallies[run]["after"] += ok[1]
            tallies[run]["pass"] += all(ok)
            case[run] = {"before": got[0], "after": got[1]}
        case["expected"] = {"before": c1, "after": c2}
        cases.append(case)
    return {"family": family, "models": models.label, "cases": len(pairs), "keyframe": keyframe,
            "before_frames": before, "after_frames": after,
            "settings": evaluation.describe_settings(settings, flow_shift=family == "hunyuan_video"),
            "seconds": time.perf_counter() - start, "tallies": tallies, "per_case": cases}


def report(result: dict) -> str:
    n = result["cases"]
    lines = [f"{result['family']} ({result['models']}): {n} colour pairs, schedule \"0\": prompt 1, "
             f"\"{result['keyframe']}\": prompt 2; {result['settings']}",
             f"judged before = frames {result['before_frames']}, after = frames {result['after_frames']}",
             f"{'run':<10}{'pass':>8}{'before ok':>11}{'after ok':>10}"]
    for run, t in result["tallies"].items():
        lines.append(f"{run:<10}{t['pass'] / n:>8.0%}{t['before'] / n:>11.0%}{t['after'] / n:>10.0%}")
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("hunyuan_video", "animatediff", "both"), default="both")
    parser.add_argument("-n", type=int, default=30, help="colour pairs per family")
    parser.add_argument("--keyframe", type=int, default=None, help="video frame of prompt 2 (default: the middle)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the full results (every case) to this file")
    args = parser.parse_args()
    families = ("hunyuan_video", "animatediff") if args.family == "both" else (args.family,)
    results = []
    for family in families:
        with host.configured(device="cpu"):
            result = run_family(family, args.n, args.keyframe, args.seed)
        print(report(result), flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
