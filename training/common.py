"""Run mechanics shared by the training stages: checkpoints, per-step randomness, loss log, progress, budget.

Exact resumption rests on one rule: everything random in step `k` (which clips, crops, noise, timesteps, caption
dropout) is drawn from generators seeded with (seed, stage, k), never from a generator carried across steps.
A checkpoint therefore needs only the step number next to the model and optimizer states; resuming at step k
replays steps k, k+1, ... exactly as an uninterrupted run would (same machine, same thread count).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import KineFlowError
from ..runtime.media import atomic_write
from ..shapes import dataset as shapes
from ..shapes import vocabulary
from ..shapes.vocabulary import Vocabulary

STAGE_IDS = {"vae": 1, "dit": 2, "cache": 3, "fit": 4, "vae_encoder": 5, "vae_decoder": 6,
             "vae_refine": 7, "unet": 8, "motion": 9, "text": 10, "vae_adapt": 11,
             "lora": 12, "i2v": 13}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (cache keys: a cache is rebuilt when a file it was made from changes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes, values): a cache key that changes only when these
    weights do, whichever file they were read from."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def step_rngs(seed: int, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch generators of one training step (a pure function of seed, stage and step)."""
    key = [int(seed), STAGE_IDS[stage], int(step)]
    rng = np.random.default_rng(key)
    gen = torch.Generator().manual_seed(int(np.random.default_rng(key + [1]).integers(2**62)))
    return rng, gen


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    settings: dict, train_seconds: float, loss_ema: float | None) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "settings": settings,
        "train_seconds": float(train_seconds),
        "loss_ema": loss_ema,
        # Not needed for exactness (see the module docstring); kept so code that uses the global RNG later
        # (e.g. dropout layers) resumes exactly too.
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file; say which one
        raise KineFlowError(f"cannot read the training checkpoint {path}: {exc}") from exc


def check_resumable(ckpt: dict, settings: dict, resume_keys: tuple[str, ...], path: Path) -> None:
    """Refuse to resume with hyper-parameters that would change the run (steps and budgets may change)."""
    stored = ckpt["settings"]
    changed = [f"{k}: checkpoint {stored.get(k)!r}, now {settings.get(k)!r}" for k in resume_keys
               if stored.get(k) != settings.get(k)]
    if changed:
        raise KineFlowError(f"cannot resume {path}: these settings differ from the checkpoint's ({'; '.join(changed)}). "
                            "Use the original values or start a new --run-dir.")


# --------------------------------------------------------------------------- log + progress
class LossLog:
    """Appends one JSON object per logged step to `log.jsonl` (lines past `step` are dropped on resume)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = open(path, "a")

    def write(self, **record) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TrainProgress:
    """`stage  step/total  loss (EMA)  it/s  ETA` on stderr (no loss for work that has none, such as encoding a
    cache): redrawn in place on a terminal, one line every `line_seconds` otherwise (nohup logs stay short)."""

    def __init__(self, desc: str, start: int, total: int, line_seconds: float = 30.0, stream=None):
        self.desc, self.start, self.total = desc, start, total
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.line_seconds = line_seconds
        self.t0 = time.monotonic()
        self.last_line = self.t0

    def update(self, step: int, loss_ema: float | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if not (self.tty or force or now - self.last_line >= self.line_seconds):
            return
        self.last_line = now
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        loss = "" if loss_ema is None else f" loss {loss_ema:.5f}"
        line = f"{self.desc} {step}/{self.total}{loss} {rate:.2f} it/s ETA {eta_text}"
        self.stream.write(("\r" + line + "  ") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class Budget:
    """Wall-clock budget in minutes (0 = none), shared by the stages that `all` runs one after another."""

    minutes: float = 0.0
    start: float = field(default_factory=time.monotonic)

    def exhausted(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.start >= self.minutes * 60.0


def ema_update(ema: float | None, value: float, decay: float = 0.98) -> float:
    return value if ema is None else decay * ema + (1.0 - decay) * value


def hardware_line() -> str:
    """The machine for a model card. Threads are not listed: each training command sets its own (`--threads`,
    shown in the card's command list), and the exporting process's count says nothing about them."""
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__}; threads per " \
           "job as each command's --threads (default 2)"


def set_threads(threads: int) -> None:
    if threads < 1:
        raise KineFlowError(f"--threads must be >= 1; got {threads}")
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- measured scores for model cards
SCORE_COLUMNS = ("colour", "shape", "direction", "scale_change", "background")


def read_eval_reports(paths: list[str | Path]) -> list[dict]:
    """`kineflow eval --json` reports, checked to be ones (a model card quotes them as measured)."""
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise KineFlowError(f"cannot read the eval report {path}: {exc}") from None
        if not isinstance(report, dict) or not {"accuracy", "settings", "prompts", "models"} <= set(report):
            raise KineFlowError(f"{path} is not a `kineflow eval --json` report (expected an object with "
                                f"accuracy, settings, prompts and models; found {type(report).__name__})")
        reports.append(report)
    return reports


def scores_section(reports: list[dict]) -> str:
    """The model card's "Measured scores" table, one row per eval report (size, steps, sampler and cfg from its
    settings; `kineflow eval -n PROMPTS --width W --height H --steps S --sampler X --cfg C [--shift F]`
    reproduces a row)."""
    if not reports:
        return ""
    percent = lambda v: "-" if v is None else f"{v:.0%}"  # noqa: E731
    rows = []
    for r in reports:
        run, mode = r["settings"], r.get("mode", "generate")
        what = f"{run['width']}x{run['height']}, "
        if mode == "reconstruct":
            what += "VAE reconstruction"
        else:
            what += f"{run['steps']} steps {run['sampler_name']}, cfg {run['cfg']:g}"
            if r.get("latent_format") == "hunyuan_video":  # the flow shift applies to this family only
                what += f", shift {run['shift']:g}"
        tc = r.get("temporal_consistency")
        rows.append(f"| {r['models']} | {what} | {r['prompts']} | "
                    + " | ".join(percent(r["accuracy"].get(c)) for c in SCORE_COLUMNS)
                    + f" | {'-' if tc is None else f'{tc:.2f}'} |")
    header = "| models | run | prompts | " + " | ".join(c.replace("_", " ") for c in SCORE_COLUMNS) + \
             " | temporal consistency |"
    return ("Measured scores (`kineflow eval --json` reports given to `export --scores`; held-out prompts, seeds "
            "0..n-1; `kineflow eval -n PROMPTS --width W --height H --steps S --sampler X --cfg C [--shift F]` "
            "reproduces a row):\n\n" + header + "\n" + "|---" * (len(SCORE_COLUMNS) + 4) + "|\n" + "\n".join(rows)
            + "\n")


NO_SCORES = ("Not measured at export: `export --scores REPORT.json ...` quotes `kineflow eval --json` reports of the "
             "exported files here.\n")


# --------------------------------------------------------------------------- model card sections
def _phrases(*tables: tuple[str, ...]) -> str:
    """Caption phrases without the connective that joins them to a verb ("and grows" -> "grows"), each once."""
    bare = (p.split(" ", 1)[1] if p.startswith(("and ", "while ")) else p for table in tables for p in table)
    return ", ".join(dict.fromkeys(bare))


def vocabulary_section(template_sets: tuple[str, ...]) -> str:
    """The model card's "Vocabulary": the words of the captions written with the sentence forms `template_sets`
    (those a shipped text encoder learned, shapes/shipped.py), the synonyms KineFlow rewrites into them, and what
    becomes of any other word."""
    rows = {
        "colour (of a shape or the background)": ", ".join(shapes.COLOURS),
        "shape": "; ".join(", ".join(options) for options in shapes.SHAPE_WORDS.values()),
        "motion": ", ".join(verb for verb, _ in shapes.MOVE_VERBS) + " (" +
                  ", ".join(participle for _, participle in shapes.MOVE_VERBS) + ")",
        **{f"direction {name}": ", ".join(options) for name, options in shapes.DIRECTION_WORDS.items()},
        "standing still": _phrases(shapes.STILL_VERB, shapes.STILL_PARTICIPLE),
        "growing": _phrases(shapes.GROW_VERB, shapes.GROW_PARTICIPLE),
        "shrinking": _phrases(shapes.SHRINK_VERB, shapes.SHRINK_PARTICIPLE),
    }
    scene_words = {w for phrase in rows.values() for w in vocabulary.words(phrase)}
    rows["the rest of the captions"] = ", ".join(sorted(Vocabulary.of_captions(template_sets).words - scene_words))
    by_phrase: dict[str, list[str]] = {}
    for word, phrase in vocabulary.SYNONYMS.items():
        by_phrase.setdefault(phrase, []).append(word)
    table = "\n".join(f"| {meaning} | {words} |" for meaning, words in rows.items())
    synonyms = "\n".join(f"| {', '.join(found)} | {phrase} |" for phrase, found in by_phrase.items())
    return f"""The model reads prompts in the words of its training captions, and only those:

| meaning | words |
|---|---|
{table}

A prompt names one or two shapes, each with a colour and a motion, and the background colour: "a red circle moves
to the right on a blue background", "a yellow square slides up and grows, black backdrop", "a red ball moves left
and a green triangle moves up on a white background". Any other word means nothing to the model: for this model,
KineFlow logs a warning naming such words and the words above. Before that it rewrites these synonyms into caption
words (and logs it); a colour outside the palette (grey, orange, purple, ...) matches none of its colours and is
left as it is:

| written | read as |
|---|---|
{synonyms}
"""


# The model cards' first "Limitations" (every model trained on the shapes world has them).
SHAPES_WORLD_LIMITATIONS = """\
- It knows the words above and no others; KineFlow warns about other words in a prompt for it.
- One or two shapes (circle, square, triangle) in eight flat colours over a flat background: no textures,
  scenes, camera motion or other objects."""


def training_data_section() -> str:
    """The model card's "Training data": the shapes world's train split."""
    return f"""\
KineFlow's procedural shapes world (`shapes/dataset.py`), train split, rendered on the fly (no external data):
clips of one or two circles, squares or triangles in eight colours, moving in eight directions or standing still,
growing or shrinking, on a background of another of the colours, each with a plain-English caption in one of the
training sentence forms. {shapes.HELDOUT_FRACTION:.0%} of the colour x shape x direction x background combinations
are held out of training; the Evaluation prompts use them.
"""


def workflow_settings_line(family: str) -> str:
    """What the family's shipped workflow samples with (`kineflow eval`'s defaults), for a model card."""
    from ..runtime.evaluation import SHIPPED_WORKFLOWS, shipped_workflow_settings

    run = shipped_workflow_settings(family)
    shift = f", shift {run.shift:g}" if family == "hunyuan_video" else ""
    return (f"`workflows/api/{SHIPPED_WORKFLOWS[family]}` (and `kineflow eval` by default) makes {run.frames} "
            f"frames of {run.width}x{run.height} with {run.sampler_name}, {run.steps} steps, cfg {run.cfg:g}{shift} "
            f"and an empty negative prompt")
