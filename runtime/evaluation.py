"""`kineflow eval`: generate a video per prompt and score it with the analytic judge (shapes/judge.py).

Prompts come from a file (one per line; their expected attributes are parsed from the words) or from the
built-in held-out set (colour x shape x direction x background combinations never seen together in training,
half of them in sentence templates never used in training). Generation goes through the same loaders and
sampler as the nodes, for either family: a HunyuanVideo-style transformer + video VAE + text encoders, or an
SD1.5 checkpoint with (or, to measure what the motion module adds, without) an AnimateDiff motion module.

`reconstruct` instead renders the held-out clips themselves and judges the VAE's encode -> decode of them:
the ceiling a generator on that VAE can reach (a shape the VAE loses, no transformer can draw).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputFileError, KineFlowError
from ..samplers.step_cache import StepCacheOptions
from ..shapes.dataset import clip_tensor, frames_to_render
from ..shapes.attributes import CONCEPTS
from ..shapes.judge import ATTRIBUTES, FAST_TRAVEL, concept_adherence, concept_judge_palette, judge, score
from ..shapes.prompts import expected_from_spec, heldout_prompts, parse_prompt
from ..shapes.shipped import ANIMATEDIFF_CHECKPOINT, ANIMATEDIFF_MOTION_MODULE
from ..shapes.shipped import HUNYUAN_VIDEO as SHIPPED_NAMES
from . import generation, host
from .media import write_video
from .video_models import load_text_encoders, load_video_model, load_video_vae

# The workflow (workflows/api/) that runs each family's shipped tiny model: `kineflow eval` samples as it does.
SHIPPED_WORKFLOWS = {"hunyuan_video": "text_to_video.json", "animatediff": "animatediff_tiny.json"}
# ... and the image-to-video workflow of each (`--image-to-video`).
IMAGE_TO_VIDEO_WORKFLOWS = {"hunyuan_video": "image_to_video.json", "animatediff": "animatediff_image_to_video.json"}
# First-frame fidelity a frame must reach to count as "the input image": PSNR in dB over 0..1 pixels.
FIRST_FRAME_PSNR_TARGET = 28.0


@dataclass
class EvalSettings:
    steps: int
    cfg: float
    shift: float  # flow shift (the AnimateDiff family ignores it)
    sampler_name: str
    scheduler: str
    width: int
    height: int
    frames: int
    seed: int = 0  # of the first prompt (prompt i uses seed + i), and of the held-out set drawn
    step_cache: float | None = None  # the Step Cache's threshold, None without it


def shipped_workflow_settings(family: str, image_to_video: bool = False) -> EvalSettings:
    """The sampler settings and video size of the family's shipped workflow (its Sampler and Empty Video Latent, or
    Image To Video, nodes), so that `kineflow eval` measures what the workflow makes and cannot drift from it. The
    seed stays 0: it also picks the held-out prompts, which must not change with the workflow's seed."""
    name = (IMAGE_TO_VIDEO_WORKFLOWS if image_to_video else SHIPPED_WORKFLOWS)[family]
    nodes = json.loads((host.PACK_DIR / "workflows" / "api" / name).read_text(encoding="utf-8")).values()
    sizes = "KineFlowImageToVideo" if image_to_video else "KineFlowEmptyVideoLatent"
    sampler, latent = ([node["inputs"] for node in nodes if node["class_type"] == kind][0]
                       for kind in ("KineFlowSampler", sizes))
    return EvalSettings(steps=sampler["steps"], cfg=sampler["cfg"], shift=sampler["shift"],
                        sampler_name=sampler["sampler_name"], scheduler=sampler["scheduler"],
                        width=latent["width"], height=latent["height"], frames=latent["frames"])


def describe_settings(settings: EvalSettings, flow_shift: bool) -> str:
    """The settings of a generating run, in one line (`flow_shift`: the family samples with a flow shift)."""
    shift = f", shift {settings.shift:g}" if flow_shift else ""
    cache = "" if settings.step_cache is None else f", step cache {settings.step_cache:g}"
    return (f"{settings.width}x{settings.height}, {settings.frames} frames, {settings.sampler_name} "
            f"({settings.scheduler} schedule), {settings.steps} steps, cfg {settings.cfg:g}{shift}{cache}, "
            f"first seed {settings.seed}")


@dataclass
class EvalModels:
    """A loaded (video model, VAE, text encoder) triple of one family and a label for reports (net and text are
    None when only the VAE is judged)."""

    net: object
    vae: object
    text: object
    label: str


def load_vae_only(family: str, name: str) -> EvalModels:
    """The VAE of a family for `reconstruct`: a video VAE file, or the VAE inside an SD1.5 checkpoint."""
    if family == "animatediff":
        from .animatediff import load_sd_checkpoint_vae

        return EvalModels(None, load_sd_checkpoint_vae(name), None, label=f"VAE of {name}")
    return EvalModels(None, load_video_vae(name), None, label=name)


def parse_lora_option(text: str) -> tuple[str, float]:
    """`FILE[:STRENGTH]` (the --lora option) -> (file, strength); a tail that is not a number is part of the name.
    FILE is a name in the loras folder, or a path: one with a folder in it is taken from the working directory."""
    name, sep, tail = text.rpartition(":")
    strength = 1.0
    if sep and name:
        try:
            strength = float(tail)
        except ValueError:
            name = text
        if not math.isfinite(strength):
            raise KineFlowError(f"--lora {text!r}: the strength must be a finite number; got {tail!r}")
    else:
        name = text
    path = Path(name).expanduser()
    if len(path.parts) > 1 and path.exists():
        name = str(path.resolve())
    return name, strength


def load_hunyuan_video(model: str = SHIPPED_NAMES["dit"], vae: str = SHIPPED_NAMES["vae"],
                       llm: str = SHIPPED_NAMES["llm"], clip: str = SHIPPED_NAMES["clip"],
                       loras: list[tuple[str, float]] = ()) -> EvalModels:
    """The family's models; `loras` [(file in loras/ or a path, strength)] go onto the transformer (and text encoders)
    in order, as Load LoRA nodes with the text encoders connected apply them (runtime/lora.py)."""
    net = load_video_model(model)
    text = load_text_encoders(llm, clip)
    label = model
    if loras:
        from .lora import load_lora

        for name, strength in loras:
            net, text = load_lora(net, text, name, strength)
            label += f" + {Path(name).name}" + ("" if strength == 1.0 else f":{strength:g}")
    return EvalModels(net, load_video_vae(vae), text, label=label)


def load_animatediff(checkpoint: str = ANIMATEDIFF_CHECKPOINT, motion_module: str | None = ANIMATEDIFF_MOTION_MODULE,
                     motion_scale: float = 1.0) -> EvalModels:
    """An SD1.5 checkpoint with `motion_module` applied, or frames denoised independently when it is None."""
    from .animatediff import apply_motion_module, load_motion_module, load_sd_checkpoint

    net, vae, text = load_sd_checkpoint(checkpoint)
    label = checkpoint
    if motion_module:
        net = apply_motion_module(net, load_motion_module(motion_module), motion_scale)
        label += f" + {motion_module}"
    return EvalModels(net, vae, text, label=label)


def read_prompt_file(path: str | Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"cannot read prompt file {str(path)!r}: {e}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputFileError(f"prompt file {str(path)!r} holds no prompts (expected one prompt per line)")
    return prompts


def generate_clip(models: EvalModels, prompt: str, settings: EvalSettings, seed: int,
                  first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """One video [frames, H, W, 3] in 0..1 for `prompt` (empty negative prompt), through the nodes' pipeline; with
    `first_frame` (IMAGE [1, H, W, 3]) through Image To Video's."""
    net = models.net
    cond = generation.encode_prompts(models.text, prompt, "")
    if first_frame is None:
        latent = generation.empty_latent(net.latent_format.name, settings.width, settings.height, settings.frames, 1)
    else:
        with host.quiet():
            cond, latent = generation.image_to_video(cond, models.vae, first_frame, settings.width, settings.height,
                                                     settings.frames, 1, "auto")
    step_cache = None if settings.step_cache is None else StepCacheOptions(settings.step_cache)
    with host.quiet():
        sampled = generation.sample_video(net, cond, latent, seed=seed, steps=settings.steps, cfg=settings.cfg,
                                          shift=settings.shift, embedded_guidance=1.0,
                                          sampler_name=settings.sampler_name, scheduler=settings.scheduler,
                                          step_cache=step_cache)
        return generation.decode_video(models.vae, sampled, tiling=None)


def reconstruct_clip(models: EvalModels, clip: torch.Tensor) -> torch.Tensor:
    """The VAE's encode -> decode of `clip` [frames, H, W, 3] in 0..1, through the nodes' VAE path."""
    with host.quiet():
        return generation.decode_video(models.vae, generation.encode_video(models.vae, clip, None), None)


def evaluate(models: EvalModels, prompts: list[str] | None = None, *, settings: EvalSettings, heldout: int = 60,
             save_dir: str | Path | None = None, reconstruct: bool = False, concept: str = "",
             image_to_video: bool = False) -> dict:
    """Generate (or, with `reconstruct`, round-trip the held-out clips through the VAE) and judge; returns
    {"accuracy": {attr: value}, "counts": ..., "temporal_consistency": ..., ...}. With `concept` (shapes/attributes.py
    CONCEPTS) the held-out set is that concept's (every first shape carries it: in its colour, or moving quickly)
    and "concept_adherence" is its own figure (for a colour concept the judge also tells its colour from the
    palette); without it, the standard held-out set and palette. With `image_to_video` each video starts from its
    held-out clip's first frame (Image To Video) and "first_frame_psnr" says how close the generated first frame is
    to it."""
    specs = None
    if (reconstruct or concept or image_to_video) and prompts is not None:
        what = ("reconstruction" if reconstruct else "a concept evaluation" if concept
                else "an image-to-video evaluation")
        raise KineFlowError(f"{what} judges built-in held-out clips, which a prompt file cannot describe; leave out "
                            "the prompt file")
    if image_to_video and reconstruct:
        raise KineFlowError("image to video generates; it cannot be combined with reconstruction")
    if concept and concept not in CONCEPTS:
        raise KineFlowError(f"unknown concept {concept!r}; expected one of {list(CONCEPTS)}")
    palette = concept_judge_palette(concept)
    if prompts is None:
        # AnimateDiff's 16 frames are the first 16 of 17, as in its trainer.
        pairs = heldout_prompts(heldout, settings.seed, frames=frames_to_render(settings.frames), height=settings.height,
                                width=settings.width, concept=concept)
        prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
        expected = [expected_from_spec(s) for s in specs]
    else:
        expected = [parse_prompt(p) for p in prompts]
    verdicts, psnrs, ceilings, unknown = [], [], [], sorted({w for e in expected for w in e.unknown_words})
    bar = host.progress(len(prompts), "reconstructing" if reconstruct else "evaluating")
    for i, prompt in enumerate(prompts):
        if reconstruct:
            frames = reconstruct_clip(models, clip_tensor(specs[i])[:settings.frames])
        elif image_to_video:
            image = clip_tensor(specs[i])[:1]
            frames = generate_clip(models, prompt, settings, seed=settings.seed + i, first_frame=image)
            psnrs.append(psnr(frames[0], image[0]))
            ceilings.append(psnr(reconstruct_clip(models, image)[0], image[0]))
        else:
            frames = generate_clip(models, prompt, settings, seed=settings.seed + i)
        verdicts.append(judge(frames, palette))
        if save_dir is not None:
            write_video(frames, Path(save_dir) / f"eval_{i:03d}.mp4", fps=8.0, format="mp4")
        bar.update(1)
    scores = score(verdicts, expected)
    adherence = concept_adherence(verdicts, expected, concept) if concept else None
    consistency = [v.temporal_consistency for v in verdicts if v.primary is not None]
    return {
        "models": models.label,
        "mode": "reconstruct" if reconstruct else "image_to_video" if image_to_video else "generate",
        "concept": concept or None,
        # The concept's own figure: shapes asked for in its colour that were drawn in it, or shapes asked to move
        # quickly whose judged travel exceeds FAST_TRAVEL (their other attributes, and the other shapes of two-shape
        # prompts, are scored under "accuracy" with the rest).
        "concept_adherence": None if adherence is None else {
            "kind": CONCEPTS[concept].kind, "meaning": concept_meaning(concept), "accuracy": adherence.accuracy,
            "correct": adherence.correct, "scored": adherence.scored},
        "latent_format": models.vae.latent_format.name,
        "prompts": len(prompts),
        "settings": settings.__dict__,
        "accuracy": {a: scores[a].accuracy for a in ATTRIBUTES},
        "counts": {a: {"correct": scores[a].correct, "scored": scores[a].scored, "skipped": scores[a].skipped}
                   for a in ATTRIBUTES},
        "temporal_consistency": float(torch.tensor(consistency).mean()) if consistency else None,
        # Image to video: how close each generated first frame is to its input image.
        "first_frame_psnr": None if not psnrs else {
            "mean": sum(psnrs) / len(psnrs), "min": min(psnrs), "target": FIRST_FRAME_PSNR_TARGET,
            "at_target": sum(p >= FIRST_FRAME_PSNR_TARGET for p in psnrs), "scored": len(psnrs),
            # The VAE's own encode -> decode of the images: the most any model on this VAE can reach.
            "vae_ceiling_mean": sum(ceilings) / len(ceilings)},
        "unknown_words": unknown,
        "per_prompt": [{"prompt": prompt, "seed": None if reconstruct else settings.seed + i,
                        "expected": _scene(e.background, e.objects), "judged": _scene(v.background, v.objects),
                        **({"first_frame_psnr": psnrs[i]} if psnrs else {})}
                       for i, (prompt, e, v) in enumerate(zip(prompts, expected, verdicts))],
    }


def psnr(frame: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two frames [H, W, 3] in 0..1 (identical frames: infinity)."""
    mse = float((frame.float() - reference.float()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def concept_meaning(concept: str) -> str:
    """What the concept's adherence line counts, in words."""
    if CONCEPTS[concept].kind == "speed":
        return f"moved {concept}: judged travel > {FAST_TRAVEL:.2f} of the shorter side"
    return "drawn in the concept colour"


def _scene(background: str, objects) -> dict:
    """What a prompt asks for or what the judge saw, in the same words (objects largest first when judged)."""
    return {"background": background,
            "objects": [{"colour": o.colour, "shape": o.shape, "direction": o.direction,
                         "scale_change": o.scale_change} for o in objects]}


def format_report(result: dict) -> str:
    run = result["settings"]
    if result["mode"] == "reconstruct":
        lines = [f"{result['models']}: VAE reconstructions of {result['prompts']} held-out clips, "
                 f"{run['width']}x{run['height']}, {run['frames']} frames"]
    else:
        settings = describe_settings(EvalSettings(**run), flow_shift=result["latent_format"] == "hunyuan_video")
        concept = result.get("concept")
        which = (f"held-out prompts of the concept '{concept}'" if concept else
                 "held-out prompts, each from its clip's first frame (image to video)"
                 if result["mode"] == "image_to_video" else "prompts")
        lines = [f"{result['models']}: {result['prompts']} {which}, {settings}"]
    lines.append(f"{'attribute':<14}{'accuracy':>9}{'correct':>9}{'scored':>8}")
    for attribute, acc in result["accuracy"].items():
        c = result["counts"][attribute]
        shown = "-" if acc is None else f"{acc:.1%}"
        lines.append(f"{attribute:<14}{shown:>9}{c['correct']:>9}{c['scored']:>8}")
    concept = result.get("concept_adherence")
    if concept is not None:
        shown = "-" if concept["accuracy"] is None else f"{concept['accuracy']:.1%}"
        lines.append(f"{result['concept'] + ' shapes':<14}{shown:>9}{concept['correct']:>9}{concept['scored']:>8}"
                     f"  ({concept['meaning']})")
    tc = result["temporal_consistency"]
    lines.append(f"temporal consistency: {'-' if tc is None else f'{tc:.3f}'}")
    first = result.get("first_frame_psnr")
    if first is not None:
        lines.append(f"first frame vs input image: PSNR mean {first['mean']:.2f} dB, min {first['min']:.2f} dB, "
                     f"{first['at_target']} of {first['scored']} at >= {first['target']:g} dB (the VAE's own "
                     f"reconstructions of the images: mean {first['vae_ceiling_mean']:.2f} dB)")
    if result["unknown_words"]:
        lines.append("words the judge cannot score: " + ", ".join(result["unknown_words"]))
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result)
