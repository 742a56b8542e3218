"""The `kineflow` command: run and validate ComfyUI workflows headless, list the pack's nodes.

Exit codes: 0 success; 2 invalid workflow or unusable input file (a path outside the input folder, a file too big
for the memory budget); 1 any other failure; stopped by a signal, 128 + its number: 130 Ctrl-C (SIGINT), 143 SIGTERM,
129 SIGHUP. SIGTERM and SIGHUP are handled like Ctrl-C: the run stops, temporary files and unwritten output names are
removed, and a repeated signal during that cleanup is ignored. Failures print one clear paragraph on stderr; `--debug`
adds the traceback.

Subcommands are entries of COMMANDS: `Command(name, help, add_arguments(parser), handler(args, context))`.
A handler returns the exit code; errors propagate to `main`, which maps them to codes and messages.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

from ..errors import InputFileError, InterruptedRun, KineFlowError
from ..models import ATTENTION_BACKENDS
from . import cpu, files
from .executor import (
    NodeExecutionError,
    WorkflowInvalid,
    execution_order,
    override_paths,
    prepare_prompt,
    run_workflow,
)
from .validation import declared_inputs, format_error

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) or host.request_interrupt()
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
SIGNAL_EXIT_BASE = 128  # a stop signal exits with 128 + its number, as shells report it: 130, 143, 129


class Context:
    """What handlers share: the node classes (the pack's own unless injected, imported on first use)."""

    def __init__(self, node_classes: dict | None = None, stdout=None, stderr=None):
        self._node_classes = node_classes
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr

    @property
    def node_classes(self) -> dict:
        if self._node_classes is None:
            from .. import NODE_CLASS_MAPPINGS

            self._node_classes = NODE_CLASS_MAPPINGS
        return self._node_classes


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, Context], int]


MODELS_DIR_HELP = ("folder with ComfyUI's model sub-folders (diffusion_models/, vae/, text_encoders/, ...); default "
                   "$KINEFLOW_MODELS, else ./kineflow_models")


THREADS_HELP = ("torch's CPU threads: N, auto (default: 1 while every model loaded is small, else one per core) or "
                "torch (torch's own defaults); default $KINEFLOW_THREADS, else OMP_NUM_THREADS when set, else auto. "
                "OpenMP waits passively (OMP_WAIT_POLICY=PASSIVE) unless you set OMP_WAIT_POLICY or give 'torch'")


def _manage_threads(args: argparse.Namespace, ctx: Context) -> None:
    """--threads / $KINEFLOW_THREADS -> runtime/cpu.py, before anything imports torch; the choice is one log line."""
    requested = args.threads
    if requested is None and os.environ.get("KINEFLOW_THREADS", "").strip():
        try:
            requested = cpu.parse_threads(os.environ["KINEFLOW_THREADS"])
        except argparse.ArgumentTypeError as exc:
            raise InputFileError(f"$KINEFLOW_THREADS: {exc}") from None
    cpu.manage_threads(requested, ctx.stderr.write)


INPUT_DIR_HELP = ("folder Load Video / Load Image read from (default ./input); a file path in the workflow must stay "
                  "inside it, a path given with --set may point anywhere")


def _warn_if_missing_models_dir(models_dir: str | None, ctx: Context) -> None:
    """One line on stderr when the models folder asked for (--models-dir, or $KINEFLOW_MODELS) does not exist."""
    folder, source = models_dir, "--models-dir"
    if not folder:
        folder, source = os.environ.get("KINEFLOW_MODELS"), "$KINEFLOW_MODELS"
    if folder and not Path(folder).is_dir():
        ctx.stderr.write(f"warning: the models folder {folder} ({source}) does not exist; only the shipped tiny "
                         "models are available.\n")


# --------------------------------------------------------------------------- run
def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="workflow JSON (UI or API format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.input=value",
                        help="override an input before running (value parsed as JSON when possible); repeatable")
    parser.add_argument("--output-dir", help="folder for outputs (default ./output)")
    parser.add_argument("--models-dir", help=MODELS_DIR_HELP)
    parser.add_argument("--input-dir", help=INPUT_DIR_HELP)
    parser.add_argument("--device", help="compute device: cpu, cuda, cuda:N, mps, or meta for a dry run that "
                                         "reads only file headers, writes nothing and prints each node's output "
                                         "shapes and the device memory the run needs (default $KINEFLOW_DEVICE, "
                                         "else the best available)")
    parser.add_argument("--memory-budget", metavar="GIB",
                        help="device memory the models may keep resident, in GiB; offload policies 'auto' and "
                             "'blocks' plan from it, and input files whose frames or pickled weights would take more "
                             "are refused before reading (default $KINEFLOW_MEMORY_BUDGET, else the free memory; for "
                             "input files half the free RAM)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS,
                        help="attention backend of the loaders left at 'auto' (default $KINEFLOW_ATTENTION, else auto: "
                             "the fastest installed one that runs on the device)")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="compile the transformer's and UNet's blocks with torch.compile in the loaders left at "
                             "'auto' (default $KINEFLOW_COMPILE=1; the first run pays the compile time)")
    parser.add_argument("--threads", type=cpu.parse_threads, metavar="N|auto|torch", help=THREADS_HELP)
    par = parser.add_argument_group(
        "parallel runs", "one run over several processes (torchrun semantics): the Sampler's transformer, context "
        "windows and VAE decode are split over the ranks, and only rank 0 writes outputs (README: 'Several GPUs')")
    par.add_argument("--nproc", type=_positive_int, metavar="N",
                     help="start N processes on this machine, one per GPU (or sharing the CPU) and run the workflow "
                          "over them")
    par.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                     help="machines taking part, each running the same command with its own --nproc (needs "
                          "--rdzv-endpoint); default 1")
    par.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous address shared by every machine")
    par.add_argument("--rdzv-id", metavar="ID", help="run id shared by every machine of one run (default: a new one "
                                                     "on one machine, 'kineflow' on several)")
    par.add_argument("--rdzv-backend", default="c10d", help="rendezvous backend (torchrun's; default c10d)")
    par.add_argument("--ulysses", type=_degree, default=0, metavar="N",
                     help="Ulysses degree: ranks that split the transformer's attention heads (default: chosen)")
    par.add_argument("--ring", type=_degree, default=0, metavar="N",
                     help="ring-attention degree: ranks that split the video tokens' keys and values (default: "
                          "chosen)")
    par.add_argument("--cfg-parallel", type=_degree, default=0, metavar="N",
                     help="1 or 2: ranks that split CFG's conditional and unconditional passes (default: 2 when "
                          "cfg is not 1 and the ranks pair up)")
    par.add_argument("--rank-timeout", type=float, metavar="SECONDS",
                     help="how long a rank waits for the others in a collective before the run fails (default "
                          "$KINEFLOW_RANK_TIMEOUT, else 60)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text}")
    return value


def _degree(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (choose) or a number of ranks, got {text}")
    return value


def _launch(args: argparse.Namespace, ctx: Context) -> int:
    """`run --nproc N` (or --nnodes): validate here, then start the workers (runtime/distributed.py)."""
    from . import distributed, host

    with host.configured(models_dir=args.models_dir, input_dir=args.input_dir, memory_budget=args.memory_budget,
                         user_paths=override_paths(args.overrides)):
        _, _, errors = prepare_prompt(args.file, overrides=args.overrides, node_classes=ctx.node_classes)
    if errors:
        raise WorkflowInvalid(errors)
    distributed.timeout_seconds(args.rank_timeout)
    device = host.parse_device(args.device) if args.device else None
    if device is not None and device.type in ("meta", "mps"):
        raise InputFileError("a dry run (--device meta) runs in one process, and MPS has no collectives; run it "
                             "without --nproc" if device.type == "meta" else "runs over several processes need CUDA "
                             "devices or the CPU; MPS has no collectives")
    low, high = distributed.check_launch(args.nproc or 1, args.nnodes, args.rdzv_endpoint)
    distributed.check_degrees(distributed.Degrees(args.ulysses, args.ring, args.cfg_parallel),
                              (args.nproc or 1) * low if low == high else None)
    run_parser = argparse.ArgumentParser(add_help=False)
    _add_run_arguments(run_parser)
    takes_value = {option for action in run_parser._actions if action.nargs != 0 for option in action.option_strings}
    worker_argv = distributed.worker_arguments(args.argv, takes_value)
    return distributed.launch(worker_argv, nproc=args.nproc or 1, nnodes=args.nnodes,
                              rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id,
                              rdzv_backend=args.rdzv_backend, debug=bool(getattr(args, "debug", False)),
                              stderr=ctx.stderr)


def _run(args: argparse.Namespace, ctx: Context) -> int:
    from . import distributed, host

    if args.nproc is not None and (args.nproc > 1 or args.nnodes != "1"):
        return _launch(args, ctx)
    if distributed.launched():  # a rank of a parallel run
        try:
            device = distributed.start(args.rank_timeout, distributed.Degrees(args.ulysses, args.ring,
                                                                              args.cfg_parallel), args.device)
            args.device = str(device)  # `cuda` becomes this rank's own cuda:LOCAL_RANK
            if distributed.is_writer():
                return _run_here(args, ctx)
            with open(os.devnull, "w") as quiet, host.quiet():  # rank 0 reports for the run
                return _run_here(args, Context(ctx._node_classes, quiet, quiet), progress=quiet)
        finally:
            distributed.stop()
    return _run_here(args, ctx)


def _run_here(args: argparse.Namespace, ctx: Context, progress=None) -> int:
    from . import host

    start = time.monotonic()
    _warn_if_missing_models_dir(args.models_dir, ctx)
    _manage_threads(args, ctx)  # before torch is imported: OpenMP reads its environment once
    device = host.parse_device(args.device) if args.device else None
    if args.attention:
        from ..models import attention

        attention.check(args.attention, device or host.compute_device())
    options = dict(overrides=args.overrides, node_classes=ctx.node_classes, output_dir=args.output_dir,
                   models_dir=args.models_dir, input_dir=args.input_dir, device=device,
                   memory_budget=args.memory_budget, attention=args.attention, compile=args.compile,
                   progress_stream=progress or ctx.stderr)
    if (device or host.compute_device()).type == "meta":
        from .plan import dry_run

        with dry_run() as plan:
            results = run_workflow(args.file, observe=plan.observe, **options)
        ctx.stdout.write(plan.report(results))
        ctx.stderr.write(f"dry run: {len(results)} nodes in {time.monotonic() - start:.1f}s\n")
        return EXIT_OK
    cpu.apply_threads()
    results = run_workflow(args.file, **options)
    saved = []
    for node_id, result in results.items():
        if result["ui"]:
            ctx.stdout.write(f"node {node_id}: {json.dumps(result['ui'], default=str)}\n")
            saved += [Path(args.output_dir or "output") / entry.get("subfolder", "") / entry["filename"]
                      for entry in result["ui"].get("images", ()) if entry.get("type") == "output"]
    ctx.stderr.write(f"done: {len(results)} nodes in {time.monotonic() - start:.1f}s\n")
    for path in saved:
        ctx.stderr.write(f"saved {path}\n")
    return EXIT_OK


# --------------------------------------------------------------------------- validate
def _add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="workflow JSON (UI or API format)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.input=value",
                        help="override an input before validating; repeatable")
    parser.add_argument("--models-dir", help=MODELS_DIR_HELP)
    parser.add_argument("--input-dir", help=INPUT_DIR_HELP)
    parser.add_argument("--memory-budget", metavar="GIB",
                        help="the memory budget of `run`, in GiB: a video larger than it holds is refused (default "
                             "$KINEFLOW_MEMORY_BUDGET, else half the free RAM)")


def _validate(args: argparse.Namespace, ctx: Context) -> int:
    from . import host

    _warn_if_missing_models_dir(args.models_dir, ctx)
    with host.configured(models_dir=args.models_dir, input_dir=args.input_dir, memory_budget=args.memory_budget,
                         user_paths=override_paths(args.overrides)):
        host.memory_budget()  # a malformed budget is one error, not one per node that reads it
        prompt, _, errors = prepare_prompt(args.file, overrides=args.overrides, node_classes=ctx.node_classes)
    if errors:
        raise WorkflowInvalid(errors)
    runs = execution_order(prompt, ctx.node_classes)
    ctx.stdout.write(f"{args.file}: valid, {len(runs)} of {len(prompt)} nodes would run.\n")
    return EXIT_OK


# --------------------------------------------------------------------------- nodes
def _add_nodes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true",
                        help="print the node reference (docs/NODES.md) instead of the one-line list")


def _type_label(kind, opts: dict) -> str:
    if isinstance(kind, (list, tuple)):
        return f"COMBO[{len(kind)}]"
    if kind == "COMBO":
        return f"COMBO[{len(opts.get('options') or [])}]"
    return str(kind)


def _nodes(args: argparse.Namespace, ctx: Context) -> int:
    if args.markdown:
        from .. import NODE_DISPLAY_NAME_MAPPINGS
        from .node_docs import node_reference_markdown

        ctx.stdout.write(node_reference_markdown(ctx.node_classes, NODE_DISPLAY_NAME_MAPPINGS))
        return EXIT_OK
    for name in sorted(ctx.node_classes):
        cls = ctx.node_classes[name]
        inputs = []
        for input_name, (category, kind, opts) in declared_inputs(cls).items():
            label = f"{input_name}:{_type_label(kind, opts)}"
            inputs.append(label if category == "required" else f"[{label}]")
        returns = tuple(getattr(cls, "RETURN_TYPES", ()))
        names = tuple(getattr(cls, "RETURN_NAMES", None) or returns)
        outputs = [f"{n}:{t}" for n, t in zip(names, returns)]
        flag = " (output node)" if getattr(cls, "OUTPUT_NODE", False) else ""
        ctx.stdout.write(f"{name}{flag}  inputs: {', '.join(inputs) or '-'}  outputs: {', '.join(outputs) or '-'}\n")
    return EXIT_OK


# --------------------------------------------------------------------------- inspect
def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="checkpoint (.safetensors, .pt/.ckpt/.bin) or Hugging Face model folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _inspect(args: argparse.Namespace, ctx: Context) -> int:
    from ..errors import ModelFileError
    from ..models.checkpoints import inspect_file

    try:
        info = inspect_file(args.file)
    except ModelFileError as exc:  # an unreadable file is a bad input file here, not a run-time failure
        raise InputFileError(str(exc)) from None
    if args.json:
        ctx.stdout.write(json.dumps(info) + "\n")
        return EXIT_OK
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))
    rows = [("family", info["family"] or f"unknown ({info['note']})"), ("layout", info["layout"]),
            ("version", info["version"]), ("parameters", f"{info['params']:,}"), ("tensors", info["tensors"]),
            ("dtypes", dtypes), ("key prefix", info["prefix"] or None), ("nested under", info["wrapper"])]
    ctx.stdout.write(f"{info['path']}\n")
    for label, value in rows:
        if value is not None:
            ctx.stdout.write(f"  {label:<11} {value}\n")
    if info["family"] and info["note"]:
        ctx.stdout.write(f"  note        {info['note']}\n")
    return EXIT_OK


# --------------------------------------------------------------------------- convert
def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="workflow JSON (UI or API format)")
    parser.add_argument("--to", required=True, choices=("ui", "api"), help="format to write")
    parser.add_argument("-o", "--output", help="file to write, atomically when it is new or a regular file; a device, "
                                               "pipe or symlink (/dev/stdout, /dev/null) is written through in "
                                               "place; default: standard output")


def _convert(args: argparse.Namespace, ctx: Context) -> int:
    from .files import write_text_to
    from .workflow import detect_format, load_workflow, ui_to_api
    from .workflow_export import api_to_ui, unknown_node_types

    workflow = load_workflow(args.file)
    source_format = detect_format(workflow, args.file)
    if source_format == args.to:
        raise InputFileError(f"{args.file} is already in {args.to.upper()} format; nothing to convert "
                             f"(--to {'api' if args.to == 'ui' else 'ui'} converts it the other way).")
    if args.to == "api":
        result, problems = ui_to_api(workflow, ctx.node_classes)
        if problems:
            raise WorkflowInvalid(problems)
    else:
        from .. import NODE_DISPLAY_NAME_MAPPINGS

        unknown = unknown_node_types(workflow, ctx.node_classes)
        if unknown:
            ctx.stderr.write(f"warning: unknown node type(s) {', '.join(unknown)}: their widget order is a guess "
                             "(constants in the prompt's order, no control values).\n")
        result = api_to_ui(workflow, ctx.node_classes, display_names=NODE_DISPLAY_NAME_MAPPINGS)
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        ctx.stdout.write(text)
        return EXIT_OK
    write_text_to(args.output, text)
    count = len(result["nodes"]) if args.to == "ui" else len(result)
    ctx.stderr.write(f"wrote {args.output} ({args.to.upper()} format, {count} nodes)\n")
    return EXIT_OK


# --------------------------------------------------------------------------- eval
def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("hunyuan_video", "animatediff"), default="hunyuan_video",
                        help="model family to generate with (default hunyuan_video)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", help="file with one prompt per line (default: the built-in held-out set)")
    parser.add_argument("-n", "--count", type=int, default=60, help="held-out prompts to generate (default 60)")
    # Sampling and size default to the family's shipped workflow (workflows/api/text_to_video.json,
    # animatediff_tiny.json): evaluation.shipped_workflow_settings.
    shipped = "(default: the family's shipped workflow's)"
    parser.add_argument("--steps", type=int, help=f"sampling steps {shipped}")
    parser.add_argument("--cfg", type=float, help=f"classifier-free guidance scale {shipped}")
    parser.add_argument("--shift", type=float, help=f"flow shift, hunyuan_video only {shipped}")
    parser.add_argument("--sampler", help=f"sampler name {shipped}")
    parser.add_argument("--scheduler", help=f"sigma spacing: default or karras (animatediff) {shipped}")
    parser.add_argument("--frames", type=int, help=f"frames per video {shipped}")
    parser.add_argument("--width", type=int, help=f"video width in pixels {shipped}")
    parser.add_argument("--height", type=int, help="video height in pixels (default: --width if given, else the "
                                                   "shipped workflow's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-cache", type=_step_cache_threshold, metavar="THRESHOLD",
                        help="sample with the Step Cache node at this threshold (default: without it)")
    tiny = "(default: the shipped tiny model's)"
    hv = parser.add_argument_group("hunyuan_video models")
    hv.add_argument("--model", help=f"transformer in diffusion_models/ {tiny}")
    hv.add_argument("--vae", help=f"VAE in vae/ {tiny}")
    hv.add_argument("--llm", help=f"LLaMA text encoder in text_encoders/ {tiny}")
    hv.add_argument("--clip", help=f"CLIP text encoder in text_encoders/ {tiny}")
    ad = parser.add_argument_group("animatediff models")
    ad.add_argument("--checkpoint", help=f"SD1.5 checkpoint in checkpoints/ {tiny}")
    ad.add_argument("--motion-module", help=f"motion module in animatediff_models/ {tiny}; 'none' denoises every "
                                            "frame on its own")
    ad.add_argument("--motion-scale", type=float, default=1.0, help="motion module strength")
    parser.add_argument("--models-dir", help=MODELS_DIR_HELP)
    parser.add_argument("--threads", type=cpu.parse_threads, metavar="N|auto|torch", help=THREADS_HELP)
    source.add_argument("--reconstruct", action="store_true",
                        help="judge the VAE alone: encode and decode the held-out clips themselves (what any "
                             "generator on this VAE can reach at best); loads only the VAE")
    from ..shapes.attributes import CONCEPTS  # plain Python: no torch at start-up

    parser.add_argument("--concept", choices=tuple(CONCEPTS),
                        help="score the held-out prompts of a concept a LoRA teaches instead of the standard held-out "
                             "set: every prompt's first shape carries it ('quickly': it is asked to move quickly, "
                             "and passes when its judged travel is long; 'orange': it is asked for in that colour, "
                             "which the judge then also knows) and the report adds the concept's own line; with "
                             "--reconstruct, the VAE's reconstructions of that concept's clips")
    hv.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                    help="apply a LoRA from loras/ (or a path) to the transformer, at STRENGTH (default 1); "
                         "repeat to chain several")
    source.add_argument("--image-to-video", action="store_true",
                        help="start each video from its held-out clip's first frame through Image To Video (sizes "
                             "and sampling from the family's image-to-video workflow, workflows/api/image_to_video.json "
                             "or animatediff_image_to_video.json; hunyuan_video's default --model: the shipped "
                             "image-to-video transformer) and report how close each generated first frame is to that "
                             "image (PSNR)")
    parser.add_argument("--save-dir", help="also write each generated video here as mp4")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a table (with each prompt's expected and judged scene "
                             "under per_prompt)")


def _default_to_shipped_models(args: argparse.Namespace) -> None:
    """Fill in the model options not given with the shipped tiny models. Not parser defaults: shapes.shipped loads
    the shapes world (numpy, torch), which `kineflow --help` must not wait for."""
    from ..shapes.shipped import (ANIMATEDIFF_CHECKPOINT, ANIMATEDIFF_MOTION_MODULE, HUNYUAN_VIDEO,
                                  HUNYUAN_VIDEO_I2V_DIT)

    transformer = HUNYUAN_VIDEO_I2V_DIT if args.image_to_video else HUNYUAN_VIDEO["dit"]
    shipped = {"model": transformer, "vae": HUNYUAN_VIDEO["vae"], "llm": HUNYUAN_VIDEO["llm"],
               "clip": HUNYUAN_VIDEO["clip"], "checkpoint": ANIMATEDIFF_CHECKPOINT,
               "motion_module": ANIMATEDIFF_MOTION_MODULE}
    for option, name in shipped.items():
        if getattr(args, option) is None:
            setattr(args, option, name)


def _step_cache_threshold(text: str) -> float:
    """argparse type of --step-cache: a bad threshold is a usage error (exit 2), caught before any model loads."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"step cache threshold must be a finite number >= 0, got {text}")
    return value


def _eval(args: argparse.Namespace, ctx: Context) -> int:
    from dataclasses import replace

    if args.lora and (args.family != "hunyuan_video" or args.reconstruct):
        ctx.stderr.write("error: --lora applies a HunyuanVideo LoRA to the transformer; it needs --family "
                         "hunyuan_video and a generating run (not --reconstruct)\n")
        return EXIT_INVALID
    _manage_threads(args, ctx)  # before torch is imported (evaluation and shapes.shipped import it)
    from . import evaluation, host

    _default_to_shipped_models(args)
    _warn_if_missing_models_dir(args.models_dir, ctx)
    cpu.apply_threads()
    host.configure(models_dir=args.models_dir)
    prompts = evaluation.read_prompt_file(args.prompts) if args.prompts else None
    given = dict(steps=args.steps, cfg=args.cfg, shift=args.shift, sampler_name=args.sampler,
                 scheduler=args.scheduler, frames=args.frames, width=args.width, height=args.height or args.width,
                 step_cache=args.step_cache)
    settings = replace(evaluation.shipped_workflow_settings(args.family, args.image_to_video), seed=args.seed,
                       **{name: value for name, value in given.items() if value is not None})
    if not args.reconstruct:
        ctx.stderr.write(f"settings: {evaluation.describe_settings(settings, args.family == 'hunyuan_video')}\n")
    if args.reconstruct:
        models = evaluation.load_vae_only(args.family, args.checkpoint if args.family == "animatediff" else args.vae)
    elif args.family == "animatediff":
        motion = None if args.motion_module.lower() == "none" else args.motion_module
        models = evaluation.load_animatediff(args.checkpoint, motion, args.motion_scale)
    else:
        models = evaluation.load_hunyuan_video(args.model, args.vae, args.llm, args.clip,
                                               loras=[evaluation.parse_lora_option(o) for o in args.lora])
    result = evaluation.evaluate(models, prompts, heldout=args.count, settings=settings, save_dir=args.save_dir,
                                 reconstruct=args.reconstruct, concept=args.concept or "",
                                 image_to_video=args.image_to_video)
    ctx.stdout.write((evaluation.to_json(result) if args.json else evaluation.format_report(result)) + "\n")
    return EXIT_OK


COMMANDS: list[Command] = [
    Command("run", "validate and execute a workflow", _add_run_arguments, _run),
    Command("validate", "check a workflow and list every problem", _add_validate_arguments, _validate),
    Command("nodes", "list node types with their inputs and outputs", _add_nodes_arguments, _nodes),
    Command("eval", "generate videos for prompts and score how well they follow them (analytic judge)",
            _add_eval_arguments, _eval),
    Command("inspect", "identify a checkpoint from its header: family, layout, version, parameters, dtypes",
            _add_inspect_arguments, _inspect),
    Command("convert", "convert a workflow between UI (canvas) and API (prompt) format", _add_convert_arguments,
            _convert),
]


def _version() -> str:
    try:
        return importlib.metadata.version("kineflow")
    except importlib.metadata.PackageNotFoundError:  # run from a ComfyUI custom_nodes folder, not pip-installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kineflow", description="Run KineFlow / ComfyUI workflows without the UI.")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"kineflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        sp = sub.add_parser(command.name, help=command.help, description=command.help)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks on errors")
        command.add_arguments(sp)
        sp.set_defaults(handler=command.handler)
    return parser


def _fail(ctx: Context, debug: bool, code: int, message: str) -> int:
    from . import distributed

    if debug:
        ctx.stderr.write(traceback.format_exc())
    ctx.stderr.write(f"{distributed.message_prefix()}error: {message}\n")
    return code


class _StopSignals:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP stop a command alike. The first one raises KeyboardInterrupt wherever the
    command is, so atomic writes and every `finally` clean up on the way out; later ones (and any after `disarm`) are
    only noted, so a second Ctrl-C cannot break that cleanup or the interpreter's exit. Installed only in the main
    thread and never inside ComfyUI, which owns its process's signals."""

    def __init__(self):
        from . import host

        self.received: int | None = None
        self._armed = True
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread() and not host.in_comfyui():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):  # Windows has no SIGHUP
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._stop)

    def _stop(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self._armed:
                self._armed = False
                raise KeyboardInterrupt

    def disarm(self) -> None:
        self._armed = False

    def restore(self) -> None:
        for number, handler in self._previous.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(number, handler)


def main(argv: list[str] | None = None, *, node_classes: dict | None = None, stdout=None, stderr=None) -> int:
    """Entry point of the `kineflow` console script; returns the exit code (see the module docstring).

    Temporary files and unwritten output names are removed on every way out. Run as the program (`argv` None) the
    stop-signal handlers stay until the process ends, so a late Ctrl-C cannot interrupt the interpreter's exit; called
    with `argv` (tests, embedding) the previous handlers come back."""
    ctx = Context(node_classes, stdout, stderr)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help or a usage error; argparse has printed the message
        return EXIT_INVALID if exc.code not in (0, None) else EXIT_OK
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `run --nproc` hands it on to its workers
    stop = _StopSignals()
    try:
        code = _handle(args, ctx, stop)
        stop.disarm()  # here, not only in `finally`: a signal arriving just before would raise inside `finally`
    except KeyboardInterrupt:  # a stop signal while a failure was being reported
        code = EXIT_INTERRUPTED
    finally:
        stop.disarm()
        files.remove_unfinished()
        cpu.release_threads()
        if argv is not None:
            stop.restore()
    return SIGNAL_EXIT_BASE + stop.received if stop.received is not None else code


def _handle(args: argparse.Namespace, ctx: Context, stop: _StopSignals) -> int:
    """Run the command's handler and map what it raises to an exit code and one message."""
    debug = bool(getattr(args, "debug", False))
    try:
        return args.handler(args, ctx)
    except WorkflowInvalid as exc:
        if debug:
            ctx.stderr.write(traceback.format_exc())
        ctx.stderr.write(f"error: workflow is invalid ({len(exc.errors)} problem(s)):\n")
        for error in exc.errors:
            ctx.stderr.write(f"  {format_error(error)}\n")
        return EXIT_INVALID
    except BrokenPipeError:  # the reader of our output went away (e.g. `kineflow nodes | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (InterruptedRun, KeyboardInterrupt):
        by = f" by {signal.Signals(stop.received).name}" if stop.received not in (None, signal.SIGINT) else ""
        from . import distributed

        if distributed.launched() and stop.received == signal.SIGTERM:  # the agent stops the ranks this way
            return _fail(ctx, debug, EXIT_INTERRUPTED, "stopped by the launcher (SIGTERM): another rank failed or "
                                                       "the run was stopped; this rank wrote nothing.")
        return _fail(ctx, debug, EXIT_INTERRUPTED, f"interrupted{by}; nothing more was run.")
    except NodeExecutionError as exc:
        code = EXIT_INVALID if isinstance(exc.original, InputFileError) else EXIT_FAILURE
        hint = "" if debug else " (run with --debug for the traceback)"
        return _fail(ctx, debug, code, f"{exc}{hint}")
    except InputFileError as exc:
        return _fail(ctx, debug, EXIT_INVALID, str(exc))
    except KineFlowError as exc:
        return _fail(ctx, debug, EXIT_FAILURE, str(exc))
    except Exception as exc:  # a bug, not a user mistake: still one paragraph unless --debug
        hint = "" if debug else " Run again with --debug for the traceback and report it."
        return _fail(ctx, debug, EXIT_FAILURE, f"unexpected internal error: {type(exc).__name__}: {exc}.{hint}")


if __name__ == "__main__":
    sys.exit(main())
