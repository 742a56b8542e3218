"""Train the tiny shipped HunyuanVideo-family model on the procedural shapes dataset, on the CPU.

Stages (each resumable, each writing into one run folder, default `runs/tiny_hv/`):

1. `vae`        - the causal 3D VAE in three phases (encoder against a linear patch decoder, decoder on the
                  frozen encoder's latents, then end to end), foreground-weighted L1 + a small KL, on random
                  crops of 9-frame clips. At the end the weights are rounded to the export dtype, the latent std
                  of full-size clips gives `scaling_factor = 1/std` and latent->RGB preview factors are fitted:
                  `vae/vae.safetensors`.
2. `vae-refine` - more decoder training with the encoder frozen (the latents do not change, so it can run
                  beside `text` and `dit`).
3. `text`       - the tiny LLaMA trained to parse captions (each colour's role, direction and scale from its
                  states), then frozen; CLIP stays at its seeded random initialisation.
4. `dit`        - the transformer, by flow matching: x_t = (1-σ)·x0 + σ·ε, target ε - x0, timestep σ·1000, on
                  latents and text conditioning computed once and cached (`dit/cache.pt`). The model is not
                  guidance-distilled (`guidance_embed=False`); classifier-free guidance comes from dropping the
                  caption (the empty prompt "" is the unconditional) 10% of the time.
                  With `--init-from FOLDER` it fine-tunes an exported model instead, adopting its VAE and text
                  encoders.
5. `export`     - `save_family` into a ComfyUI-style models folder (diffusion_models/, vae/, text_encoders/) in
                  fp16, with the preview factors in the DiT's metadata and a generated MODEL_CARD.md.

`all` runs them in order under one time budget; with `--resume` it continues whichever stage is unfinished.
Two more stages fine-tune an exported model and are not part of `all`: `lora` (a LoRA teaching it a new word,
training/train_lora.py) and `i2v` (an image-to-video transformer grown from its text-to-video one,
training/train_i2v.py); what they share lives in training/fine_tune.py.

    python -m kineflow.training.train all --resume --threads 1 --max-minutes 120 --out weights/

(training/README.md has the measured speeds and the recommended commands per stage.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from ..models import hunyuan_video_dit as dit_mod
from ..models.clip_text import CLIPTextModel
from ..models.hunyuan_text import HunyuanTextEncoder
from ..models.hunyuan_video_vae import HunyuanVideoVAE, fit_latent_rgb_factors
from ..models.llama_text import LlamaTextEncoder
from ..models.tokenization import clip_l_tokenizer, load_tokenizer
from ..errors import InterruptedRun, KineFlowError
from ..runtime.media import atomic_write
from ..shapes import dataset as shapes
from ..shapes.shipped import TEXT_ENCODER_TEMPLATES
from ..shapes.vocabulary import caption_phrases
from .common import (NO_SCORES, SHAPES_WORLD_LIMITATIONS, STAGE_IDS, Budget, LossLog, TrainProgress, check_resumable,
                     ema_update, file_digest, hardware_line, load_checkpoint, read_eval_reports, save_checkpoint,
                     scores_section, set_threads, step_rngs, training_data_section, vocabulary_section,
                     workflow_settings_line)
from .tiny_models import TinyFamily, save_family, save_safetensors, tiny_family, write_word_tokenizer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SIZE_LIMIT_MB = 25.0
COMMANDS_FILE = "commands.txt"
FIT_CLIPS = 32  # full-size clips used to measure the latent std and fit the preview factors


# --------------------------------------------------------------------------- settings
def _opt(default, help_text: str, **kwargs):
    return field(default=default, metadata={"help": help_text, **kwargs})


# The `decay_steps` setting of every stage that has one (run_loop applies it).
DECAY_STEPS_HELP = ("the last N of --steps decay the learning rate linearly to 0 (0 = constant); may change on "
                    "--resume before the decay has begun")


@dataclass
class VAESettings:
    encoder_steps: int = _opt(1200, "phase 1: steps of the encoder against a linear patch decoder")
    encoder_lr: float = _opt(1e-3, "phase 1 Adam learning rate (after a linear warm-up)")
    encoder_head: str = _opt("linear", "phase 1 stand-in decoder: 'linear' (a 1x1 conv from each latent voxel to its "
                                       "pixels) or 'mlp' (that plus a zero-initialised MLP with a hidden layer of "
                                       "--head-width, so the latent need not be linear in the pixels)",
                             choices=("linear", "mlp"))
    head_width: int = _opt(256, "hidden width of the 'mlp' phase-1 head")
    decoder_steps: int = _opt(800, "phase 2: steps of the decoder on the frozen encoder's latents")
    decoder_lr: float = _opt(5e-4, "phase 2 Adam learning rate")
    steps: int = _opt(600, "phase 3: steps of the whole VAE fine-tuned end to end (a resumed run continues up "
                           "to this)")
    lr: float = _opt(2e-4, "phase 3 Adam learning rate")
    batch_size: int = _opt(8, "clips per step")
    crop: int = _opt(32, "side of the random square crop trained on (multiple of 8, <= 64)")
    warmup: int = _opt(50, "warm-up steps of each phase")
    foreground_weight: float = _opt(4.0, "extra L1 weight of pixels that differ from the clip's background")
    kl_weight: float = _opt(1e-4, "weight of the mean per-element KL term")
    edge_weight: float = _opt(0.1, "phase 3 weight of the L1 loss on x/y/t differences (sharp edges, clean "
                                        "motion)")
    clips: int = _opt(10_000, "size of the training clip index space")
    seed: int = _opt(0, "seed of data order, crops, noise and initialisation")
    dtype: str = _opt("fp16", "export dtype; the final VAE is rounded to it before its latents are measured",
                      choices=tuple(DTYPES))
    save_every: int = _opt(100, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")


@dataclass
class RefineSettings:
    steps: int = _opt(2000, "decoder steps (a resumed run continues up to this)")
    lr: float = _opt(5e-4, "Adam learning rate (after a linear warm-up)")
    warmup: int = _opt(50, "warm-up steps")
    decay_steps: int = _opt(0, DECAY_STEPS_HELP)
    batch_size: int = _opt(8, "clips per step")
    crop: int = _opt(32, "side of the random square crop trained on (multiple of 8, <= --size)")
    size: int = _opt(64, "width and height of the rendered clips the crops are cut from (shapes scale with it; "
                         "match the transformer's --size)")
    latent_noise: float = _opt(0.0, "Gaussian noise of std up to this (uniform per clip, in units of the scaled "
                                    "latent the transformer generates) added to the decoder's input, so that it "
                                    "draws clean outlines from a generated latent's small errors (0 = none)")
    foreground_weight: float = _opt(4.0, "extra L1 weight of pixels that differ from the clip's background")
    edge_weight: float = _opt(0.1, "weight of the L1 loss on x/y/t differences")
    clips: int = _opt(10_000, "size of the training clip index space")
    seed: int = _opt(0, "seed of data order, crops and noise")
    dtype: str = _opt("fp16", "export dtype", choices=tuple(DTYPES))
    save_every: int = _opt(100, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")


@dataclass
class AdaptSettings:
    generator: str = _opt("", "exported models folder (e.g. the run's `export --out` folder) whose transformer makes "
                              "the latents the decoder adapts to; its VAE encoder must be this run's")
    steps: int = _opt(800, "decoder steps (a resumed run continues up to this)")
    lr: float = _opt(2e-4, "Adam learning rate (after a linear warm-up)")
    warmup: int = _opt(50, "warm-up steps")
    decay_steps: int = _opt(240, DECAY_STEPS_HELP)
    batch_size: int = _opt(4, "clips per step (each as a generated and a real latent)")
    crop: int = _opt(6, "side, in latent cells, of the crop trained on, placed over a shape (8 pixels a cell)")
    pairs: int = _opt(3000, "training clips the transformer regenerates (cached in vae_adapt/pairs.pt)")
    size: int = _opt(128, "width and height of the clips (the transformer's --size)")
    two_shape_prob: float = _opt(0.7, "fraction of the clips with two shapes")
    min_denoise: float = _opt(0.5, "least noise level a clip's latent is re-noised to before the transformer "
                                   "regenerates it (the layout of the clip survives, the detail is the transformer's)")
    max_denoise: float = _opt(0.9, "greatest such noise level")
    sample_steps: int = _opt(12, "Euler steps of each regeneration (shift 3, cfg 1: the workflow's sampler)")
    foreground_weight: float = _opt(4.0, "extra L1 weight of pixels that differ from the clip's background")
    edge_weight: float = _opt(0.1, "weight of the L1 loss on x/y/t differences")
    seed: int = _opt(8, "seed of the clips, noise levels, sampling noise and crops")
    dtype: str = _opt("fp16", "export dtype", choices=tuple(DTYPES))
    save_every: int = _opt(100, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")


@dataclass
class TextSettings:
    steps: int = _opt(1400, "optimizer steps (a resumed run continues up to this)")
    batch_size: int = _opt(64, "captions per step")
    lr: float = _opt(2e-3, "AdamW learning rate (after a linear warm-up)")
    warmup: int = _opt(50, "warm-up steps")
    clips: int = _opt(20_000, "size of the training caption index space")
    seed: int = _opt(0, "seed of data order and of the encoders' initialisation")
    dtype: str = _opt("fp16", "export dtype; the trained LLaMA is rounded to it", choices=tuple(DTYPES))
    save_every: int = _opt(250, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")


@dataclass
class DiTSettings:
    steps: int = _opt(12000, "optimizer steps in total (a resumed run continues up to this)")
    batch_size: int = _opt(64, "latents per step")
    lr: float = _opt(5e-4, "AdamW learning rate (after a linear warm-up)")
    warmup: int = _opt(100, "warm-up steps")
    clips: int = _opt(4000, "training clips encoded once into the latent + text cache")
    two_shape_prob: float = _opt(0.25, "fraction of the cached clips with two shapes (the dataset's default is 0.25)")
    decay_steps: int = _opt(0, DECAY_STEPS_HELP)
    size: int = _opt(64, "width and height of the training clips in pixels (a multiple of 8 x --patch-size); the "
                         "shapes scale with it, so a larger size gives the transformer more tokens per shape")
    patch_size: int = _opt(2, "spatial patch of the transformer's tokens (HunyuanVideo's is 2: one token per 2x2 "
                              "latent pixels, 16x16 video pixels; 1 gives 4x the tokens)")
    double_blocks: int = _opt(2, "double-stream blocks of the transformer; with --init-from, more than the base has "
                                 "appends blocks that start as the identity (see grown_dit_state)")
    single_blocks: int = _opt(2, "single-stream blocks of the transformer (grown like --double-blocks)")
    caption_dropout: float = _opt(0.1, "probability of training a clip with the empty prompt (for CFG)")
    foreground_weight: float = _opt(0.0, "extra loss weight of the latent cells a shape covers or borders (the flat "
                                         "background fills most of the latent and is easy, so outlines count for "
                                         "little in a plain MSE); 0 = plain MSE")
    later_frame_weight: float = _opt(1.0, "loss weight of the latent frames after the first (each codes four video "
                                          "frames of motion, the first one frame alone); 1 = all equal")
    shift: float = _opt(3.0, "flow shift applied to the sampled sigma, as the sampler shifts its schedule")
    sigma_sampling: str = _opt("logit_normal", "distribution of the unshifted sigma",
                               choices=("logit_normal", "uniform"))
    seed: int = _opt(0, "seed of data order, noise, text encoders and initialisation")
    init_from: str = _opt("", "fine-tune: an exported models folder (e.g. weights) whose transformer this run starts "
                              "from and whose VAE and text encoders it adopts; '' = train from scratch")
    dtype: str = _opt("fp16", "export dtype; the frozen text encoders are rounded to it before caching",
                      choices=tuple(DTYPES))
    save_every: int = _opt(250, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")

    def __post_init__(self):
        unit = 8 * self.patch_size  # VAE downscale x token patch
        if self.size < unit or self.size % unit:
            raise KineFlowError(f"--size must be a positive multiple of {unit} (8 x --patch-size); got {self.size}")


@dataclass
class FineTuneSettings:
    """What the stages that fine-tune an exported transformer (`lora`, `i2v`) share: their clips, batches and
    checkpoints, and the flow-matching loss (`dit_loss`) as the shipped transformer's last fine-tune had it."""

    batch_size: int = _opt(16, "latents per step")
    warmup: int = _opt(50, "warm-up steps")
    two_shape_prob: float = _opt(0.3, "fraction of the cached clips with two shapes")
    size: int = _opt(128, "width and height of the clips (the base transformer's training size)")
    save_every: int = _opt(100, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")

    caption_dropout: float = _opt(0.1, "probability of training a clip with the empty prompt (for CFG; an image "
                                       "to video model keeps the image, as the reference pipelines give both "
                                       "branches the image)")
    foreground_weight: float = _opt(16.0, "extra loss weight of the latent cells a shape covers or borders "
                                          "(the shipped transformer's last fine-tune used 16)")
    later_frame_weight: float = _opt(1.0, "loss weight of the latent frames after the first")
    shift: float = _opt(3.0, "flow shift applied to the sampled sigma")
    sigma_sampling: str = _opt("logit_normal", "distribution of the unshifted sigma",
                               choices=("logit_normal", "uniform"))

    def __post_init__(self):
        if self.size < 16 or self.size % 16:
            raise KineFlowError(f"--size must be a positive multiple of 16; got {self.size}")


@dataclass
class LoraSettings(FineTuneSettings):
    """`lora`: a LoRA teaching an exported tiny model a new word, a concept (training/train_lora.py)."""

    concept: str = _opt("quickly", "the new word to teach (shapes/attributes.py CONCEPTS): 'quickly', a speed word "
                                   "(the first shape travels ~1.5x farther), or 'orange', a colour word (which the "
                                   "shipped VAE cannot render: training/README.md)",
                        choices=tuple(shapes.CONCEPTS))
    base: str = _opt("", "exported models folder whose transformer, VAE and text encoders the LoRA is trained "
                         "on ('' = the pack's shipped weights/)")
    rank: int = _opt(8, "LoRA rank (the file is ~74 KB per rank unit in fp16 with the default targets)")
    alpha: float = _opt(8.0, "LoRA alpha: the update is up @ down * alpha / rank (kohya / musubi semantics)")
    targets: str = _opt("blocks+text", "layers that get a LoRA: 'blocks' (every linear of the double and single "
                                       "blocks) or 'blocks+text' (also the text refiner txt_in and the CLIP vector_in, "
                                       "which read the prompt)", choices=("blocks", "blocks+text"))
    steps: int = _opt(800, "optimizer steps (a resumed run continues up to this)")
    concept_fraction: float = _opt(0.5, "share of each batch drawn from the concept's clips; the rest are the base "
                                        "model's own training clips, so the rest of what it draws stays as it was")
    lr: float = _opt(1e-3, "AdamW learning rate of the LoRA weights (after a linear warm-up)")
    twins: str = _opt("off", "on: every concept clip of a batch comes with its twin (the same scene without the "
                             "concept: normal speed, no word; speed concepts), taken from the base share, so the word "
                             "is the only difference the LoRA can learn from", choices=("off", "on"))
    preserve: str = _opt("data", "what the base clips of a batch are fitted to: 'data' (the flow-matching target, as "
                                 "in the base model's training) or 'distill' (the base model's own prediction, LoRA "
                                 "off: keeps what it draws without the word; one more forward of those rows)",
                         choices=("data", "distill"))
    decay_steps: int = _opt(200, DECAY_STEPS_HELP)
    concept_clips: int = _opt(600, "concept clips (train split of the concept's combinations) encoded into the cache")
    base_clips: int = _opt(600, "base training clips encoded into the cache (the regularising share)")
    seed: int = _opt(11, "seed of the clips, batches, noise and the LoRA's initialisation")
    dtype: str = _opt("fp16", "dtype of the exported LoRA file", choices=tuple(DTYPES))

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise KineFlowError(f"--rank must be >= 1; got {self.rank}")
        if not 0.0 < self.concept_fraction <= 1.0:
            raise KineFlowError(f"--concept-fraction must be in (0, 1]; got {self.concept_fraction}")
        if self.twins == "on" and self.concept_fraction > 0.5:
            raise KineFlowError(f"--twins on pairs each concept clip with its twin, so --concept-fraction can be at "
                                f"most 0.5; got {self.concept_fraction}")
        if self.twins == "on" and shapes.CONCEPTS[self.concept].kind != "speed":
            raise KineFlowError(f"--twins is for speed concepts; '{self.concept}' is a {shapes.CONCEPTS[self.concept].kind}")


@dataclass
class I2VSettings(FineTuneSettings):
    """`i2v`: an image-to-video transformer fine-tuned from an exported text-to-video one (training/train_i2v.py)."""

    base: str = _opt("", "exported models folder whose transformer the image-to-video model starts from and whose "
                         "VAE and text encoders it reads ('' = the pack's shipped weights/)")
    steps: int = _opt(5000, "optimizer steps (a resumed run continues up to this); the defaults are the shipped "
                            "model's run")
    lr: float = _opt(2e-4, "AdamW learning rate (after a linear warm-up)")
    decay_steps: int = _opt(1200, DECAY_STEPS_HELP)
    clips: int = _opt(4000, "training clips encoded once into the latent + text cache")
    seed: int = _opt(23, "seed of the clips, batches and noise (another than the base's, so the clips are new)")
    dtype: str = _opt("fp16", "dtype of the exported transformer", choices=tuple(DTYPES))

    def __post_init__(self):
        super().__post_init__()
        if self.clips < 1:
            raise KineFlowError(f"--clips must be >= 1; got {self.clips}")


def _train_i2v(run_dir: Path, settings: I2VSettings, *, resume: bool = False,
               budget: Budget | None = None) -> StageResult:
    from .train_i2v import train_i2v  # it builds on this module's loop and losses

    return train_i2v(run_dir, settings, resume=resume, budget=budget)


def _train_lora(run_dir: Path, settings: LoraSettings, *, resume: bool = False,
                budget: Budget | None = None) -> StageResult:
    from .train_lora import train_lora  # it builds on this module's loop and losses

    return train_lora(run_dir, settings, resume=resume, budget=budget)


# Settings that may change between a run and its resumption (everything else must match the checkpoint).
FREE_SETTINGS = ("steps", "encoder_steps", "decoder_steps", "decay_steps", "save_every", "log_every")


def _resume_keys(settings) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(settings) if f.name not in FREE_SETTINGS)


# --------------------------------------------------------------------------- vocabulary and model family
def caption_vocabulary() -> list[str]:
    """Every phrase the dataset's captions are built from, train, held-out and extra templates alike, so a
    word-level tokenizer never sees an unknown word."""
    return caption_phrases()


def build_family(llama_vocab: int) -> TinyFamily:
    """`tiny_family` without the guidance embedding: this model is trained with real CFG, not distilled."""
    family = tiny_family(llama_vocab)
    family.dit = dataclasses.replace(family.dit, guidance_embed=False)
    return family


def round_to(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Round the weights to `dtype` in place (kept in float32), so training sees what the exported file holds."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return module


class _AutogradRMSNorm(dit_mod.RMSNorm):
    """The DiT's q/k RMSNorm with an out-of-place forward: the inference version updates the norm's output in
    place, which autograd rejects. Same parameter name (`weight`), same result."""

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def trainable_dit(config: dit_mod.HunyuanVideoDiTConfig) -> dit_mod.HunyuanVideoDiT:
    net = dit_mod.HunyuanVideoDiT(config)
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is dit_mod.RMSNorm:
                replacement = _AutogradRMSNorm(child.weight.shape[0], child.eps)
                replacement.weight = child.weight
                setattr(module, name, replacement)
    return net


# --------------------------------------------------------------------------- data
def video_batch(data: shapes.ShapesVideoDataset, indices) -> tuple[torch.Tensor, list[str]]:
    """Clips as the VAE takes them: [B, 3, F, H, W] in -1..1, plus their captions."""
    videos, captions, _ = data.batch(indices)
    return videos.permute(0, 4, 1, 2, 3).mul(2.0).sub(1.0).contiguous(), captions


def random_crops(video: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    _, _, _, h, w = video.shape
    if size % 8 or not 8 <= size <= min(h, w):
        raise KineFlowError(f"--crop must be a multiple of 8 between 8 and {min(h, w)}; got {size}")
    ys = rng.integers(0, h - size + 1, len(video))
    xs = rng.integers(0, w - size + 1, len(video))
    return torch.stack([v[:, :, y:y + size, x:x + size] for v, y, x in zip(video, ys, xs)])


# --------------------------------------------------------------------------- the shared loop
@dataclass
class StageResult:
    finished: bool  # reached the stage's step count
    step: int
    steps_run: int  # optimizer steps taken by this call
    train_seconds: float  # over every call of this stage


def run_loop(stage: str, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
             settings, *, resume: bool, budget: Budget, steps: int | None = None,
             lr: float | None = None) -> StageResult:
    """Step `model` with `loss_fn(step) -> scalar loss` up to `steps` (default settings.steps) at peak rate `lr`
    (default settings.lr), checkpointing and logging.

    Warm-up (and the optional final decay) set the learning rate from the step alone and the loss function draws
    its randomness from `step_rngs`, so a resumed run is the uninterrupted run."""
    total = settings.steps if steps is None else steps
    peak_lr = settings.lr if lr is None else lr
    decay_steps = getattr(settings, "decay_steps", 0)  # only some stages' settings have a final decay
    ckpt_path = run_dir / stage / "ckpt.pt"
    as_dict = dataclasses.asdict(settings)
    step, seconds, loss_ema = 0, 0.0, None
    if ckpt_path.exists():
        if not resume:
            raise KineFlowError(f"{ckpt_path} already exists; pass --resume to continue it or use another --run-dir")
        ckpt = load_checkpoint(ckpt_path)
        # A setting added to the code after the checkpoint was written stands at its default there.
        ckpt["settings"] = {**dataclasses.asdict(type(settings)()), **ckpt["settings"]}
        check_resumable(ckpt, as_dict, _resume_keys(settings), ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, seconds, loss_ema = ckpt["step"], ckpt["train_seconds"], ckpt["loss_ema"]
    start_step = step
    log = LossLog(run_dir / stage / "log.jsonl", step)
    bar = TrainProgress(stage, step, total)

    def checkpoint():
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step, settings=as_dict,
                        train_seconds=seconds, loss_ema=loss_ema)

    model.train()
    try:
        while step < total and not budget.exhausted():
            t0 = time.monotonic()
            rate = peak_lr * min(1.0, (step + 1) / max(settings.warmup, 1))
            if decay_steps:
                rate *= min(1.0, (total - step) / decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = rate
            loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise KineFlowError(f"{stage} loss became {loss.item()} at step {step}; lower --lr and resume "
                                    "from the last checkpoint")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            seconds += time.monotonic() - t0
            loss_ema = ema_update(loss_ema, loss.item())
            if step % settings.log_every == 0 or step == total:
                log.write(step=step, loss=loss.item(), loss_ema=loss_ema, lr=rate, train_seconds=round(seconds, 2))
            bar.update(step, loss_ema, force=step == total)
            if step % settings.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        raise InterruptedRun(f"{stage} training interrupted at step {step}; resume with --resume "
                             f"(the last checkpoint is at step {step - step % settings.save_every})") from None
    finally:
        bar.close()
        log.close()
    if step != start_step:
        checkpoint()
    if step < total:
        saved = "checkpoint saved" if step != start_step else "no step taken"
        sys.stderr.write(f"{stage}: time budget reached at step {step}/{total}; {saved}, continue with --resume\n")
    model.eval()
    return StageResult(step >= total, step, step - start_step, seconds)


# --------------------------------------------------------------------------- stage 1: VAE
# Trained in three phases, because the causal VAE trained end to end from scratch does not learn at this size:
# on the shapes clips it settles within a few hundred steps on one flat colour for the whole data set (L1 ~0.57,
# diffusers' AutoencoderKLHunyuanVideo at the same config does exactly the same), while each half learns fast
# alone. So: (1) the encoder learns latents against a linear patch decoder (a 1x1 conv to the 4x8x8 pixels of
# each latent), which cannot ignore its input; (2) the real decoder learns to read those latents, the encoder
# frozen; (3) both are fine-tuned together with the final objective. training/README.md has the measurements.
def foreground_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, F, H, W]: 1 + `weight` where a pixel differs from its clip's background.

    Shapes cover ~10% of a frame, so a plain L1 is dominated by the background and blurs the shapes away; the
    background of a shapes clip is its per-channel median colour."""
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]
    mask = ((video - background).abs().sum(dim=1, keepdim=True) > 0.15).float()
    return 1.0 + weight * mask


def recon_loss(recon: torch.Tensor, video: torch.Tensor, settings: VAESettings, edges: bool = False) -> torch.Tensor:
    """Foreground-weighted L1, plus (phase 3 only) L1 of the x/y/t differences for sharp edges and clean
    motion. From scratch the difference term wins: a flat output matches the mostly-zero differences of flat
    shapes, and phase 1 then collapses to a constant output (L1 0.81 after 200 steps with weight 0.5, against
    0.38 without it)."""
    weights = foreground_weights(video, settings.foreground_weight)
    loss = ((recon - video).abs() * weights).mean() / weights.mean()
    if edges and settings.edge_weight:
        diffs = sum((recon.diff(dim=d) - video.diff(dim=d)).abs().mean() for d in (2, 3, 4))
        loss = loss + settings.edge_weight * diffs
    return loss


def kl_loss(posterior) -> torch.Tensor:
    return 0.5 * (posterior.mean.square() + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()


def posterior_sample(posterior, gen: torch.Generator) -> torch.Tensor:
    return posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)


def vae_loss(vae: HunyuanVideoVAE, video: torch.Tensor, gen: torch.Generator, settings: VAESettings) -> torch.Tensor:
    """Phase 3 (and the objective proper): reconstruct from a posterior sample, plus the weighted KL."""
    posterior = vae.encode(video)
    recon = vae.decode(posterior_sample(posterior, gen))
    return recon_loss(recon, video, settings, edges=True) + settings.kl_weight * kl_loss(posterior)


class PatchDecoder(torch.nn.Module):
    """Phase 1's stand-in decoder: per latent voxel, a 1x1 conv to its r x s x s pixels (r frames, s x s pixels;
    latent frame 0 is video frame 0 alone, as in the causal VAE). It sees one voxel only, so it cannot do without
    the latent.

    With `hidden`, a two-layer MLP (1x1 convs around a SiLU, its output zero at the start) is added to the
    linear map. The linear map alone keeps the latent linear in the pixels, close to a PCA of 4x8x8 blocks,
    and loses corners (its own reconstructions score 46% on shape, training/README.md). The MLP alone sits on a
    plateau (L1 0.46 after 800 steps, where the linear head is at 0.19); starting as the linear head avoids it."""

    def __init__(self, vae: HunyuanVideoVAE, hidden: int = 0):
        super().__init__()
        c = vae.config
        self.r, self.s, self.out = c.temporal_compression_ratio, c.spatial_compression_ratio, c.out_channels
        pixels = self.out * self.r * self.s * self.s
        self.proj = torch.nn.Conv3d(c.latent_channels, pixels, 1)
        self.mlp = None
        if hidden:
            self.mlp = torch.nn.Sequential(torch.nn.Conv3d(c.latent_channels, hidden, 1), torch.nn.SiLU(),
                                           torch.nn.Conv3d(hidden, pixels, 1))
            torch.nn.init.zeros_(self.mlp[2].weight)
            torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = z.shape
        r, s = self.r, self.s
        y = self.proj(z) if self.mlp is None else self.proj(z) + self.mlp(z)
        y = y.reshape(b, self.out, r, s, s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.out, t * r, h * s, w * s)[:, :, r - 1:]


def encoder_loss(vae: HunyuanVideoVAE, head: PatchDecoder, video, gen, settings: VAESettings) -> torch.Tensor:
    posterior = vae.encode(video)
    recon = head(posterior_sample(posterior, gen))
    return recon_loss(recon, video, settings) + settings.kl_weight * kl_loss(posterior)


def decoder_loss(vae: HunyuanVideoVAE, video, gen, settings: VAESettings) -> torch.Tensor:
    with torch.no_grad():
        z = posterior_sample(vae.encode(video), gen)
    return recon_loss(vae.decode(z), video, settings)


VAE_PHASES = ("vae_encoder", "vae_decoder", "vae")  # checkpoint folders, in training order


def vae_path(run_dir: Path) -> Path:
    return run_dir / "vae" / "vae.safetensors"


def train_vae(run_dir: Path, settings: VAESettings, *, resume: bool = False, budget: Budget | None = None) -> StageResult:
    """The three phases in order, each with its own checkpoint folder (`vae_encoder/`, `vae_decoder/`, `vae/`).
    Re-running with `resume` replays finished phases from their checkpoints and continues the unfinished one."""
    run_dir, budget = Path(run_dir), budget or Budget()
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train")
    torch.manual_seed(settings.seed)
    vae = HunyuanVideoVAE(build_family(1).vae)
    head = PatchDecoder(vae, settings.head_width if settings.encoder_head == "mlp" else 0)
    phases = (  # names as in VAE_PHASES
        ("vae_encoder", torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv, "head": head}),
         settings.encoder_steps, settings.encoder_lr, lambda video, gen: encoder_loss(vae, head, video, gen, settings)),
        ("vae_decoder", torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}),
         settings.decoder_steps, settings.decoder_lr, lambda video, gen: decoder_loss(vae, video, gen, settings)),
        ("vae", vae, settings.steps, settings.lr, lambda video, gen: vae_loss(vae, video, gen, settings)),
    )
    result = None
    for stage, trained, steps, lr, loss_of in phases:
        def loss_fn(step: int, stage=stage, loss_of=loss_of) -> torch.Tensor:
            rng, gen = step_rngs(settings.seed, stage, step)
            video, _ = video_batch(data, rng.integers(0, settings.clips, settings.batch_size))
            return loss_of(random_crops(video, settings.crop, rng), gen)

        optimizer = torch.optim.Adam(trained.parameters(), lr=lr)
        result = run_loop(stage, run_dir, trained, optimizer, loss_fn, settings, steps=steps, lr=lr, resume=resume,
                          budget=budget)
        if not result.finished:
            return result
    if result.steps_run or not vae_path(run_dir).exists():
        finalize_vae(run_dir, vae, data, settings)
    return result


def train_decoder(stage: str, run_dir: Path, settings, make_loss, *, resume: bool,
                  budget: Budget | None) -> StageResult:
    """The decoder-only stages (`vae-refine`, `vae-adapt`): train the finished VAE's decoder, encoder frozen,
    with `make_loss(vae)(step)`, starting from the decoder the stage first found (kept in
    `<stage>/start.safetensors`, so resumes start from it too); then save the VAE with its file's metadata (the
    latent statistics belong to the unchanged encoder)."""
    run_dir = Path(run_dir)
    vae, metadata = load_trained_vae(run_dir)
    start = run_dir / stage / "start.safetensors"
    if not start.exists():
        save_safetensors(vae.state_dict(), start)
    vae.load_state_dict(load_file(str(start)))
    before = encoder_digest(vae)
    vae.requires_grad_(False)
    trained = torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv})
    trained.requires_grad_(True)
    loss_fn = make_loss(vae)
    optimizer = torch.optim.Adam(trained.parameters(), lr=settings.lr)
    result = run_loop(stage, run_dir, trained, optimizer, loss_fn, settings, resume=resume, budget=budget or Budget())
    if result.finished and result.steps_run:
        round_to(vae, DTYPES[settings.dtype]).eval()
        save_safetensors(vae.state_dict(), vae_path(run_dir), metadata)
        if encoder_digest(vae) != before:
            raise KineFlowError(f"{stage.replace('_', '-')} changed the encoder's latents; this is a bug")
    return result


def refine_vae(run_dir: Path, settings: RefineSettings, *, resume: bool = False,
               budget: Budget | None = None) -> StageResult:
    """Stage `vae-refine`: more decoder training on the finished VAE, the encoder frozen.

    The latents (and so the transformer's cache and training) do not change, so this can run on the second
    core while the `dit` stage trains; `export` takes whichever decoder `vae/vae.safetensors` holds then."""
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train",
                                     height=settings.size, width=settings.size)

    def make_loss(vae: HunyuanVideoVAE):
        def loss_fn(step: int) -> torch.Tensor:
            rng, gen = step_rngs(settings.seed, "vae_refine", step)
            video, _ = video_batch(data, rng.integers(0, settings.clips, settings.batch_size))
            video = random_crops(video, settings.crop, rng)
            with torch.no_grad():
                z = posterior_sample(vae.encode(video), gen)
                if settings.latent_noise:
                    std = settings.latent_noise * torch.rand(len(z), generator=gen).view(-1, 1, 1, 1, 1)
                    z = z + std / vae.config.scaling_factor * torch.randn(z.shape, generator=gen)
            return recon_loss(vae.decode(z), video, settings, edges=True)
        return loss_fn

    return train_decoder("vae_refine", run_dir, settings, make_loss, resume=resume, budget=budget)


def adapt_clips(settings: AdaptSettings) -> shapes.ShapesVideoDataset:
    """The training clips of `vae-adapt`: pair i is clip i of this dataset."""
    return shapes.ShapesVideoDataset(length=settings.pairs, seed=settings.seed, split="train", height=settings.size,
                                     width=settings.size, two_shape_prob=settings.two_shape_prob)


def adapt_pairs(run_dir: Path, settings: AdaptSettings, vae: HunyuanVideoVAE) -> torch.Tensor:
    """Unscaled latents [pairs, C, T, h, w]: training clip i, encoded, re-noised to a random level in
    [min_denoise, max_denoise] and regenerated from there by the generator's transformer under its own caption
    (the runtime's video-to-video path). Cached in vae_adapt/pairs.pt, saved every 100 pairs (a stopped build
    continues where it was, and a larger --pairs extends it), keyed by the generator's transformer and every
    setting that shapes a pair."""
    from ..runtime import generation, host  # the runtime's sampling path, exactly as the workflow runs it
    from ..runtime.evaluation import load_hunyuan_video

    generator = Path(settings.generator)
    files = {part: str(base_file(generator, part).resolve()) for part in ("dit", "vae", "llm", "clip")}
    key = {"dit": file_digest(Path(files["dit"])), "encoder": encoder_digest(vae),
           **{k: getattr(settings, k) for k in ("size", "two_shape_prob", "min_denoise", "max_denoise", "sample_steps",
                                                 "seed")}}  # not `pairs`: pair i depends only on i, so more extend
    path = run_dir / "vae_adapt" / "pairs.pt"
    done = torch.load(path, weights_only=True) if path.exists() else None
    latents = list(done["latents"]) if done is not None and done["key"] == key else []
    if len(latents) >= settings.pairs:  # cached: the generator's models are not needed
        return torch.stack(latents[:settings.pairs])
    models = load_hunyuan_video(files["dit"], files["vae"], files["llm"], files["clip"])
    if encoder_digest(models.vae.vae) != encoder_digest(vae):
        raise KineFlowError(f"--generator {generator}: its VAE encoder differs from this run's; the decoder must adapt "
                            "to the latents of the encoder it decodes for (export the run, then pass that folder)")
    data = adapt_clips(settings)
    bar = TrainProgress("pairs", len(latents), settings.pairs)
    for i in range(len(latents), settings.pairs):
        video, captions, _ = data.batch([i])
        level = np.random.default_rng([settings.seed, STAGE_IDS["vae_adapt"], i]).uniform(settings.min_denoise,
                                                                                           settings.max_denoise)
        with host.quiet():
            start = generation.encode_video(models.vae, video[0], None)
            sampled = generation.sample_video(models.net, generation.encode_prompts(models.text, captions[0], ""),
                                              start, seed=i, steps=settings.sample_steps, cfg=1.0, shift=3.0,
                                              embedded_guidance=1.0, sampler_name="euler", denoise=float(level))
        latents.append((sampled["samples"][0] / vae.config.scaling_factor).half())
        bar.update(i + 1)
        if (i + 1) % 100 == 0 or i + 1 == settings.pairs:
            with atomic_write(path) as tmp:
                torch.save({"key": key, "latents": torch.stack(latents)}, tmp)
    bar.close()
    return torch.stack(latents)


def shape_crops(video: torch.Tensor, cells: int, rng: np.random.Generator) -> tuple[list[slice], list[slice]]:
    """Per clip, the rows and columns (in latent cells) of a `cells`-square crop centred near a random pixel of a
    shape, give or take one cell (most of a frame is flat background, which every decoder draws well)."""
    shapes_mask = (foreground_weights(video, 1.0) > 1.0)[:, 0].any(dim=1)  # [B, H, W]
    cells_high, cells_wide = video.shape[-2] // 8, video.shape[-1] // 8
    rows, cols = [], []
    for mask in shapes_mask:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        pick = rng.integers(len(ys)) if len(ys) else None
        centre = (int(ys[pick]) // 8, int(xs[pick]) // 8) if pick is not None else (cells_high // 2, cells_wide // 2)
        y0, x0 = (int(np.clip(c - cells // 2 + rng.integers(-1, 2), 0, n - cells))
                  for c, n in zip(centre, (cells_high, cells_wide)))
        rows.append(slice(y0, y0 + cells))
        cols.append(slice(x0, x0 + cells))
    return rows, cols


def adapt_vae(run_dir: Path, settings: AdaptSettings, *, resume: bool = False,
              budget: Budget | None = None) -> StageResult:
    """Stage `vae-adapt`: the decoder (encoder frozen) learns to draw each training clip from the latent the
    transformer regenerates for it, as well as from its real latent.

    The transformer's latents are not noisy copies of real ones: it rounds the corners of squares in the latent
    frames that code four frames of motion, and a decoder trained on real latents (or on noised real latents,
    `vae-refine --latent-noise`) draws what it is given. Half of each step's loss is on real latents so that
    reconstructions keep their quality. `export` then takes the adapted decoder."""
    if not settings.generator:
        raise KineFlowError("vae-adapt needs --generator: an exported models folder whose transformer makes the "
                            "latents the decoder adapts to (e.g. the run's export folder)")
    data = adapt_clips(settings)

    def make_loss(vae: HunyuanVideoVAE):
        generated = adapt_pairs(Path(run_dir), settings, vae)

        def loss_fn(step: int) -> torch.Tensor:
            rng, _ = step_rngs(settings.seed, "vae_adapt", step)
            indices = rng.integers(0, settings.pairs, settings.batch_size)
            video, _ = video_batch(data, indices)
            rows, cols = shape_crops(video, settings.crop, rng)
            crops = torch.stack([v[:, :, 8 * r.start:8 * r.stop, 8 * c.start:8 * c.stop]
                                 for v, r, c in zip(video, rows, cols)])
            fake = torch.stack([generated[i][:, :, r, c] for i, r, c in zip(indices, rows, cols)]).float()
            with torch.no_grad():
                real = vae.encode(crops).mean
            return (recon_loss(vae.decode(fake), crops, settings, edges=True)
                    + recon_loss(vae.decode(real), crops, settings, edges=True))
        return loss_fn

    return train_decoder("vae_adapt", run_dir, settings, make_loss, resume=resume, budget=budget)


def finalize_vae(run_dir: Path, vae: HunyuanVideoVAE, data: shapes.ShapesVideoDataset, settings) -> Path:
    """Round to the export dtype, set scaling_factor = 1/std of full-size latents, fit preview factors, save.

    Only the `vae` stage does this: the statistics belong to the encoder, which `vae-refine` keeps (and so
    keeps its file's metadata, even when the dataset changed in between)."""
    round_to(vae, DTYPES[settings.dtype]).eval()
    videos, latents = fit_latents(vae, data, settings.seed, settings.clips)
    std, mean = latents.std().item(), latents.mean().item()
    vae.config = dataclasses.replace(vae.config, scaling_factor=1.0 / std)
    factors, bias = fit_latent_rgb_factors(vae, videos)
    preview = json.dumps({"factors": factors.tolist(), "bias": bias.tolist()})
    return save_safetensors(vae.state_dict(), vae_path(run_dir), {
        "scaling_factor": vae.config.scaling_factor, "norm_num_groups": vae.config.norm_num_groups,
        "kineflow.latent_rgb_factors": preview,
        "kineflow.latent_mean": mean, "kineflow.latent_std": std})


def fit_latents(vae: HunyuanVideoVAE, data: shapes.ShapesVideoDataset, seed: int,
                clips: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """FIT_CLIPS full-size clips (in batches of 8) and their unscaled posterior means."""
    rng, _ = step_rngs(seed, "fit", 0)
    indices = rng.choice(clips, size=min(FIT_CLIPS, clips), replace=False)
    videos = [video_batch(data, indices[i:i + 8])[0] for i in range(0, len(indices), 8)]
    with torch.no_grad():
        return videos, torch.cat([vae.encode(v).mean for v in videos])


def read_vae_file(path: Path) -> tuple[HunyuanVideoVAE, dict]:
    """A VAE file this trainer wrote (a run's `vae/` or an export's), frozen, in fp32, with its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "scaling_factor" not in metadata:
        raise KineFlowError(f"{path} has no scaling_factor metadata: expected a VAE file this trainer wrote "
                            "(its 'vae' stage or `export`)")
    config = dataclasses.replace(build_family(1).vae, scaling_factor=float(metadata["scaling_factor"]),
                                 norm_num_groups=int(metadata.get("norm_num_groups", build_family(1).vae.norm_num_groups)))
    vae = HunyuanVideoVAE(config)
    vae.load_state_dict(load_file(str(path)))
    return vae.eval().requires_grad_(False), metadata


def load_trained_vae(run_dir: Path) -> tuple[HunyuanVideoVAE, dict]:
    path = vae_path(run_dir)
    if not path.exists():
        raise KineFlowError(f"no trained VAE at {path}; run the 'vae' stage to the end first")
    return read_vae_file(path)


# --------------------------------------------------------------------------- frozen text encoders
def prepare_text_encoders(run_dir: Path, seed: int, dtype: torch.dtype,
                          trained_llama: bool = True) -> tuple[HunyuanTextEncoder, TinyFamily]:
    """The run's tokenizer and frozen LLaMA + CLIP: seeded random (created once, then read back from `text/`),
    the LLaMA replaced by the `text` stage's trained one when that exists (and `trained_llama`)."""
    text_dir = Path(run_dir) / "text"
    tokenizer_dir = text_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        write_word_tokenizer(tokenizer_dir, caption_vocabulary())
    family = build_family(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size())
    torch.manual_seed(seed)
    llama, clip = LlamaTextEncoder(family.llama), CLIPTextModel(family.clip)
    for name, module in (("llama", llama), ("clip", clip)):
        path = text_dir / f"{name}.safetensors"
        if path.exists():
            module.load_state_dict(load_file(str(path)))
        else:
            save_safetensors(round_to(module, dtype).state_dict(), path)
        module.eval().requires_grad_(False)
    if trained_llama and trained_llama_path(run_dir).exists():
        llama.load_state_dict(load_file(str(trained_llama_path(run_dir))))
    return HunyuanTextEncoder(llama, load_tokenizer(tokenizer_dir), clip, clip_l_tokenizer()), family


# --------------------------------------------------------------------------- stage: text encoder
# A frozen *random* LLaMA keeps which words a caption has but hardly which colour goes with which role: a
# transformer trained on it painted "a green triangle on a white background" as white on green (at 3000 steps:
# colour 48-61%, background 44-50%). Real HunyuanVideo reads a pretrained LLM. Here the tiny LLaMA is trained
# first to parse captions into their scene: from the mean of the caption tokens' states at the layer the
# transformer reads, linear heads predict for every colour its role (absent, background, or the shape it
# colours), and that shape's direction and scale change. Then it is frozen as before, so conditioning is
# still computed once and cached.
ROLES = ("absent", "background", *shapes.SHAPES)


def scene_targets(spec: shapes.ClipSpec) -> tuple[list[int], list[int], list[int]]:
    """Per colour (in COLOURS order): role index, direction index and scale-change index (-100 = no shape)."""
    colours = list(shapes.COLOURS)
    roles, directions, scales = [0] * len(colours), [-100] * len(colours), [-100] * len(colours)
    roles[colours.index(spec.background)] = ROLES.index("background")
    for shape in spec.shapes:
        i = colours.index(shape.colour)
        roles[i] = ROLES.index(shape.kind)
        directions[i] = list(shapes.DIRECTIONS).index(shape.direction)
        scales[i] = shapes.SCALE_CHANGES.index(shape.scale_change)
    return roles, directions, scales


class SceneHeads(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        n = len(shapes.COLOURS)
        self.sizes = (len(ROLES), len(shapes.DIRECTIONS), len(shapes.SCALE_CHANGES))
        self.proj = torch.nn.Linear(width, n * sum(self.sizes))

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, width] -> role, direction and scale logits, each [B, colours, classes]."""
        out = self.proj(pooled).view(len(pooled), len(shapes.COLOURS), sum(self.sizes))
        return out.split(self.sizes, dim=-1)


def caption_states(encoder: HunyuanTextEncoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The states the transformer reads (with gradients), and their mask, padded to the longest caption."""
    texts = [encoder.template.replace("{}", c) for c in captions]
    ids, mask = encoder.llama_tokenizer.encode(texts, encoder.max_length, pad=False)
    states = encoder.llama(ids, mask, output_hidden_layer=-(encoder.hidden_state_skip_layer + 1))
    return states[:, encoder.crop_start:], mask[:, encoder.crop_start:]


def scene_logits(states_of, heads: SceneHeads, captions: list[str]) -> tuple[torch.Tensor, ...]:
    """Scene logits from the mean of the caption tokens' states; `states_of(captions) -> (states, mask)` is the
    text encoder's reader (caption_states for the LLaMA, train_animatediff.clip_states for CLIP)."""
    states, mask = states_of(captions)
    m = mask[..., None].to(states.dtype)
    return heads((states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0))


def text_loss(states_of, heads: SceneHeads, captions: list[str], specs) -> torch.Tensor:
    targets = [torch.tensor(t) for t in zip(*(scene_targets(s) for s in specs))]
    logits = scene_logits(states_of, heads, captions)
    return sum(F.cross_entropy(lg.flatten(0, 1), tg.flatten(), ignore_index=-100) for lg, tg in zip(logits, targets))


def scene_accuracy(states_of, heads: SceneHeads, data: shapes.ShapesVideoDataset) -> dict:
    """Fraction of captions whose whole scene (every colour's role, direction, scale) is read right."""
    specs, captions = zip(*(data.spec_and_caption(i) for i in range(len(data))))
    with torch.no_grad():
        logits = scene_logits(states_of, heads, list(captions))
    targets = [torch.tensor(t) for t in zip(*(scene_targets(s) for s in specs))]
    result = {}
    for name, lg, tg in zip(("roles", "directions", "scales"), logits, targets):
        ok = (lg.argmax(-1) == tg) | (tg == -100)
        result[name] = ok.all(dim=1).float().mean().item()
    return result


def train_scene_parser(stage: str, run_dir: Path, part: str, encoder: torch.nn.Module, states_of, width: int,
                       settings: TextSettings, *, resume: bool, budget: Budget | None) -> tuple[StageResult, dict]:
    """Train `encoder` (made trainable here; checkpointed under the name `part`) with linear scene heads on its
    mean caption state; once the stage is finished, round it to the export dtype and return its held-out scene
    accuracy (else {})."""
    encoder.train().requires_grad_(True)
    torch.manual_seed(settings.seed)
    heads = SceneHeads(width)
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train")
    model = torch.nn.ModuleDict({part: encoder, "heads": heads})

    def loss_fn(step: int) -> torch.Tensor:
        rng, _ = step_rngs(settings.seed, stage, step)
        specs, captions = zip(*(data.spec_and_caption(int(i)) for i in rng.integers(0, settings.clips,
                                                                                      settings.batch_size)))
        return text_loss(states_of, heads, list(captions), specs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    result = run_loop(stage, run_dir, model, optimizer, loss_fn, settings, resume=resume, budget=budget or Budget())
    if not result.finished:
        return result, {}
    round_to(encoder, DTYPES[settings.dtype]).eval()
    heldout = shapes.ShapesVideoDataset(length=500, seed=settings.seed, split="heldout")
    accuracy = scene_accuracy(states_of, heads, heldout)
    sys.stderr.write(f"{stage}: held-out captions read right: {json.dumps(accuracy)}\n")
    return result, accuracy


def train_text(run_dir: Path, settings: TextSettings, *, resume: bool = False,
               budget: Budget | None = None) -> StageResult:
    """Stage `text`: train the tiny LLaMA to parse captions (see above); writes text/llama_trained.safetensors."""
    run_dir = Path(run_dir)
    encoder, _ = prepare_text_encoders(run_dir, settings.seed, DTYPES[settings.dtype], trained_llama=False)
    result, accuracy = train_scene_parser("text", run_dir, "llama", encoder.llama, lambda c: caption_states(encoder, c),
                                          encoder.llama.config.hidden_size, settings, resume=resume, budget=budget)
    if accuracy and (result.steps_run or not trained_llama_path(run_dir).exists()):
        save_safetensors(encoder.llama.state_dict(), trained_llama_path(run_dir),
                         {"kineflow.heldout_scene_accuracy": json.dumps(accuracy)})
    return result


def trained_llama_path(run_dir: Path) -> Path:
    return Path(run_dir) / "text" / "llama_trained.safetensors"


# --------------------------------------------------------------------------- stage 2: DiT
def encoder_digest(vae: HunyuanVideoVAE) -> str:
    """Digest of what the latents depend on (encoder, quant_conv, scaling factor): `vae-refine` changes only
    the decoder, so the transformer's cache stays valid."""
    digest = hashlib.sha256(repr(vae.config.scaling_factor).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pad_text(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim or right-pad text columns to `length` (only all-padding columns are ever trimmed)."""
    states, mask = states[:, :length], mask[:, :length]
    pad = length - states.shape[1]
    return F.pad(states, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def build_cache(run_dir: Path, settings: DiTSettings, vae: HunyuanVideoVAE, encoder: HunyuanTextEncoder,
                batch: int = 16) -> dict:
    """Scaled latents (posterior means) and text conditioning of the training clips, plus the empty prompt."""
    path = Path(run_dir) / "dit" / "cache.pt"
    key = {"clips": settings.clips, "seed": settings.seed, "dataset": shapes.DATASET_VERSION,
           "two_shape_prob": settings.two_shape_prob, "size": settings.size,
           "vae_encoder": encoder_digest(vae),
           "llama": hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in
                                            encoder.llama.state_dict().values())).hexdigest()}
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache["key"] == key:
            return cache
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train",
                                     two_shape_prob=settings.two_shape_prob, height=settings.size,
                                     width=settings.size)
    latents, states, masks, pooled, captions = [], [], [], [], []
    bar = TrainProgress("dit cache", 0, settings.clips)
    with torch.no_grad():
        for start in range(0, settings.clips, batch):
            video, texts = video_batch(data, range(start, min(start + batch, settings.clips)))
            latents.append(vae.encode_latents(video))
            text = encoder.encode(texts)
            states.append(text["text_states"])
            masks.append(text["text_mask"])
            pooled.append(text["text_states_2"])
            captions += texts
            bar.update(start + len(texts))
        bar.close()
        length = max(int(m.sum(dim=1).max()) for m in masks)
        uncond = encoder.encode([""])
    states, masks = zip(*(_pad_text(s, m, length) for s, m in zip(states, masks)))
    u_states, u_mask = _pad_text(uncond["text_states"], uncond["text_mask"], length)
    cache = {"key": key, "latents": torch.cat(latents), "text_states": torch.cat(states), "text_mask": torch.cat(masks),
             "text_states_2": torch.cat(pooled), "uncond_states": u_states, "uncond_mask": u_mask,
             "uncond_states_2": uncond["text_states_2"], "captions": captions}
    with atomic_write(path) as tmp:
        torch.save(cache, tmp)
    return cache


def sample_sigmas(batch: int, settings: DiTSettings, gen: torch.Generator) -> torch.Tensor:
    if settings.sigma_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=gen))
    else:
        u = torch.rand(batch, generator=gen)
    return settings.shift * u / (1.0 + (settings.shift - 1.0) * u)


def dit_loss(dit: dit_mod.HunyuanVideoDiT, cache: dict, indices, gen: torch.Generator,
             settings: DiTSettings, teacher=None, taught=None) -> torch.Tensor:
    """Flow-matching MSE on a batch of cached clips; dropped captions use the cached empty prompt. With `teacher`
    (a callable taking the transformer's inputs) the rows where the boolean `taught` is True are fitted to its
    prediction instead of the flow-matching target (distillation: the LoRA stage's base clips). An image-to-video
    (latent_concat) transformer also gets each clip's first latent frame, as Image To Video gives it."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    x0 = cache["latents"][idx]
    b = len(idx)
    sigma = sample_sigmas(b, settings, gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(b, generator=gen) < settings.caption_dropout
    s = sigma.view(b, 1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    pick = lambda key, ukey: torch.where(drop.view(-1, *[1] * (cache[key].ndim - 1)),  # noqa: E731
                                         cache[ukey].expand_as(cache[key][idx]), cache[key][idx])
    inputs = (x_t, sigma * 1000.0, pick("text_states", "uncond_states"), pick("text_mask", "uncond_mask"),
              pick("text_states_2", "uncond_states_2"))
    image = {}
    if dit.config.image_condition == "latent_concat":  # an image-to-video model sees the clip's first latent frame
        image["image_latent"] = dit_mod.image_condition_channels(dit.config, x0[:, :, :1], x0.shape[2])
    velocity = dit(*inputs, **image)
    target = noise - x0
    if teacher is not None and bool(taught.any()):
        with torch.no_grad():
            target = target.clone()
            target[taught] = teacher(*(t[taught] for t in inputs)).float()
    if not settings.foreground_weight and settings.later_frame_weight == 1.0:
        return F.mse_loss(velocity.float(), target)
    weight = torch.ones_like(x0[:, :1])
    if settings.foreground_weight:
        weight = weight + settings.foreground_weight * foreground_cells(x0)
    weight[:, :, 1:] *= settings.later_frame_weight
    return ((velocity.float() - target).square() * weight).mean() / weight.mean()


# Distance (over channels, in scaled-latent units) from the clip's background latent beyond which a cell shows a
# shape: flat background cells measure ~0.01-0.1, cells a shape covers 1-7 (the shipped VAE).
FOREGROUND_LATENT_DISTANCE = 0.5


def foreground_cells(latents: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, H, W] 1.0 on the cells of `latents` [B, C, T, H, W] a shape covers or borders, else 0.0.

    The background latent of a frame is its per-channel median over positions (shapes cover well under half of
    every frame); the cells found are grown by one cell so that the outline's partly covered cells count too."""
    background = latents.flatten(3).median(dim=3).values[..., None, None]
    shape = (latents - background).norm(dim=1, keepdim=True) > FOREGROUND_LATENT_DISTANCE
    return F.max_pool3d(shape.float(), kernel_size=(1, 3, 3), stride=1, padding=(0, 1, 1))


def dit_text_and_family(run_dir: Path, settings: DiTSettings) -> tuple[HunyuanTextEncoder, TinyFamily]:
    """The frozen text encoders the transformer reads, and the family with the transformer config of `settings`."""
    encoder, family = prepare_text_encoders(run_dir, settings.seed, DTYPES[settings.dtype])
    family.dit = dataclasses.replace(family.dit, patch_size=(1, settings.patch_size, settings.patch_size),
                                     mm_double_blocks_depth=settings.double_blocks,
                                     mm_single_blocks_depth=settings.single_blocks)
    return encoder, family


# Modulation chunks that gate a block's residual branches: (shift1, scale1, gate1, shift2, scale2, gate2) in a
# double-stream block's img_mod / txt_mod, (shift, scale, gate) in a single-stream block's modulation.
_GATE_CHUNKS = {"img_mod": (6, (2, 5)), "txt_mod": (6, (2, 5)), "modulation": (3, (2,))}


def grown_dit_state(base: dict[str, torch.Tensor], dit: dit_mod.HunyuanVideoDiT) -> dict[str, torch.Tensor]:
    """`base` (a transformer's state dict) for the deeper `dit`: blocks the base lacks are copies of its last block
    of the same kind with their gates zeroed, so the grown network computes exactly what the base did and
    training opens the new blocks from there (adaLN-Zero, as DiT initialises every block)."""
    state = dict(base)
    for kind, count in (("double_blocks", len(dit.double_blocks)), ("single_blocks", len(dit.single_blocks))):
        have = len({key.split(".")[1] for key in base if key.startswith(kind + ".")})
        if have > count:
            raise KineFlowError(f"--init-from: the base transformer has {have} {kind.replace('_', '-')}, this run asks "
                                f"for {count}; a fine-tune can add blocks, not remove them")
        prefix = f"{kind}.{have - 1}."
        for index in range(have, count):
            for key, tensor in base.items():
                if not key.startswith(prefix):
                    continue
                tensor = tensor.clone()
                factor, gates = _GATE_CHUNKS.get(key[len(prefix):].split(".")[0], (1, ()))
                for chunk in gates:  # the linear's output (weight rows, bias) is `factor` chunks of hidden
                    tensor.unflatten(0, (factor, -1))[chunk] = 0
                state[f"{kind}.{index}.{key[len(prefix):]}"] = tensor
    return state


def dit_checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "dit" / "ckpt.pt"


def train_dit(run_dir: Path, settings: DiTSettings, *, resume: bool = False, budget: Budget | None = None) -> StageResult:
    run_dir = Path(run_dir)
    if settings.init_from:
        base_patch = adopt_base(run_dir, Path(settings.init_from))["training"]["dit"]["patch_size"]
        if base_patch != settings.patch_size:
            raise KineFlowError(f"--init-from {settings.init_from}: its transformer has --patch-size {base_patch}, "
                                f"this run asks for {settings.patch_size}; a fine-tune keeps the base's patch")
    vae, _ = load_trained_vae(run_dir)
    encoder, family = dit_text_and_family(run_dir, settings)
    cache = build_cache(run_dir, settings, vae, encoder)
    torch.manual_seed(settings.seed)
    dit = trainable_dit(family.dit)
    if settings.init_from:  # a resumed run then loads its checkpoint over these
        dit.load_state_dict(grown_dit_state(load_file(str(base_file(Path(settings.init_from), "dit"))), dit))
    optimizer = torch.optim.AdamW(dit.parameters(), lr=settings.lr, weight_decay=0.0)
    n = len(cache["latents"])

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = step_rngs(settings.seed, "dit", step)
        return dit_loss(dit, cache, rng.integers(0, n, settings.batch_size), gen, settings)

    return run_loop("dit", run_dir, dit, optimizer, loss_fn, settings, resume=resume, budget=budget or Budget())


# --------------------------------------------------------------------------- fine-tuning an exported model
BASE_FILE = "base.json"  # in the run folder: the record of the exported model a fine-tune started from


def base_file(models_dir: Path, part: str) -> Path:
    """The shipped-name file (or LLaMA folder) of `part` in an exported models folder; a clear error if absent."""
    sub = "diffusion_models" if part == "dit" else "vae" if part == "vae" else "text_encoders"
    path = models_dir / sub / tiny_family(1).names[part]
    if not path.exists():
        raise KineFlowError(f"--init-from {models_dir}: expected an exported tiny model there (as `export` writes), "
                            f"but {path} does not exist")
    return path


def adopt_base(run_dir: Path, models_dir: Path) -> dict:
    """Make `run_dir` hold the VAE (`vae/`) and frozen text encoders (`text/`) of the exported model in
    `models_dir`, and record its training history in `base.json` (the model card quotes it). Done once; a run
    folder that already adopted another model, or has its own VAE, is refused rather than mixed."""
    record_path = run_dir / BASE_FILE
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if Path(record["from"]).resolve() != models_dir.resolve():
            raise KineFlowError(f"{run_dir} was started from {record['from']}, not {models_dir}; use a new --run-dir")
        return record
    if vae_path(run_dir).exists() or (run_dir / "text").exists():
        raise KineFlowError(f"{run_dir} already has its own VAE or text encoders; --init-from needs a new --run-dir")
    from safetensors import safe_open

    with safe_open(str(base_file(models_dir, "dit")), "pt") as f:
        dit_meta = f.metadata() or {}
    if "kineflow.training" not in dit_meta:
        raise KineFlowError(f"{base_file(models_dir, 'dit')} has no kineflow.training metadata: --init-from takes "
                            "a folder written by this trainer's `export`")
    llm = base_file(models_dir, "llm")
    text_dir = run_dir / "text"
    (text_dir / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(llm / name, text_dir / "tokenizer" / name)
    for name in ("llama.safetensors", trained_llama_path(run_dir).name):
        shutil.copyfile(llm / "model.safetensors", text_dir / name)
    shutil.copyfile(base_file(models_dir, "clip"), text_dir / "clip.safetensors")

    vae, vae_meta = read_vae_file(base_file(models_dir, "vae"))
    # The exported file keeps only what loaders need; the run's VAE file also carries the latent statistics,
    # measured again on the base run's clips.
    training = json.loads(dit_meta["kineflow.training"])
    seed, clips = training["vae"]["seed"], training["vae"]["clips"]
    _, latents = fit_latents(vae.eval(), shapes.ShapesVideoDataset(length=clips, seed=seed, split="train"), seed, clips)
    save_safetensors(vae.state_dict(), vae_path(run_dir), {
        **vae_meta, "kineflow.latent_rgb_factors": dit_meta["kineflow.latent_rgb_factors"],
        "kineflow.latent_mean": latents.mean().item(), "kineflow.latent_std": 1.0 / vae.config.scaling_factor})
    card = models_dir / "MODEL_CARD.md"
    commands = [line.strip() for line in card.read_text().split("Commands of this run", 1)[-1].splitlines()
                if line.startswith("    ")] if card.exists() else []
    record = {"from": str(models_dir), "training": training, "commands": commands}
    with atomic_write(record_path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return record


# --------------------------------------------------------------------------- stage 3: export
def export(run_dir: Path, out: Path, dtype_name: str = "fp16", scores: list[dict] = ()) -> dict[str, Path]:
    """Write the trained parts with `save_family` (+ tokenizer, MODEL_CARD.md, quoting the eval reports
    `scores`) under `out`; returns the paths."""
    run_dir, out = Path(run_dir), Path(out)
    ckpt_path = dit_checkpoint_path(run_dir)
    if not ckpt_path.exists():
        raise KineFlowError(f"no transformer checkpoint at {ckpt_path}; run the 'dit' stage first")
    dit_ckpt = load_checkpoint(ckpt_path)
    dit_settings = DiTSettings(**dit_ckpt["settings"])
    vae, vae_meta = load_trained_vae(run_dir)
    encoder, family = dit_text_and_family(run_dir, dit_settings)
    dit = trainable_dit(family.dit)
    dit.load_state_dict(dit_ckpt["model"])
    vae_ckpts = {phase: load_checkpoint(run_dir / phase / "ckpt.pt")
                 for phase in (*VAE_PHASES, "vae_refine", "vae_adapt") if (run_dir / phase / "ckpt.pt").exists()}
    base = json.loads((run_dir / BASE_FILE).read_text()) if (run_dir / BASE_FILE).exists() else None
    # A fine-tune's `vae-refine` continues the adopted decoder, so its steps add to the base's (a fine-tune run
    # cannot train the other phases: `--init-from` refuses a run folder with a VAE of its own).
    vae_steps = dict(base["training"]["vae_steps"]) if base else {}
    for phase, ckpt in vae_ckpts.items():
        vae_steps[phase] = vae_steps.get(phase, 0) + ckpt["step"]
    # Phases run with 0 steps leave no checkpoint (e.g. the decoder trained by `vae-refine` instead); every
    # checkpoint of the `vae` stage stores the same settings, so the last one present stands for them. A
    # fine-tune's VAE was trained in its base's run.
    vae_settings = [vae_ckpts[phase]["settings"] for phase in VAE_PHASES if phase in vae_ckpts]
    if not vae_settings and base:
        vae_settings = [base["training"]["vae"]]
    if not vae_settings:
        raise KineFlowError(f"no VAE training checkpoint in {run_dir} ({', '.join(VAE_PHASES)}/ckpt.pt); the model "
                            "card needs the VAE's training record")
    vae_settings = vae_settings[-1]
    training = {"dit_steps": dit_ckpt["step"], "vae_steps": vae_steps, "dit": dit_ckpt["settings"], "vae": vae_settings}
    if base:
        training["fine_tuned_from"] = base["training"]
    dit_meta = {"kineflow.latent_rgb_factors": vae_meta["kineflow.latent_rgb_factors"],
                "kineflow.training": json.dumps(training)}
    paths = save_family(out, family, dit, vae, encoder.llama, encoder.clip, dtype=DTYPES[dtype_name],
                        dit_metadata=dit_meta)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(run_dir / "text" / "tokenizer" / name, paths["llm"] / name)
    sizes = {part: _size_mb(path) for part, path in paths.items()}
    commands_file = run_dir / COMMANDS_FILE
    commands = commands_file.read_text().splitlines() if commands_file.exists() else []
    card = model_card(family, vae_ckpts, vae_settings, dit_ckpt, vae_meta, sizes, dtype_name, commands, base,
                      list(scores))
    with atomic_write(out / "MODEL_CARD.md") as tmp:
        tmp.write_text(card)
    total = sum(sizes.values())
    if total > SIZE_LIMIT_MB:
        sys.stderr.write(f"warning: the exported weights take {total:.1f} MB, more than the {SIZE_LIMIT_MB} MB budget\n")
    return {**paths, "card": out / "MODEL_CARD.md"}


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


BASE_RUN_MARKERS = re.compile(r"^(\(base run\) )+")


def model_card(family: TinyFamily, vae_ckpts: dict, vae_settings: dict, dit_ckpt: dict, vae_meta: dict,
               sizes: dict, dtype_name: str, commands: list[str], base: dict | None = None,
               scores: list[dict] = ()) -> str:
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    with torch.device("meta"):
        counts = {"dit": params(dit_mod.HunyuanVideoDiT(family.dit)), "vae": params(HunyuanVideoVAE(family.vae)),
                  "llm": params(LlamaTextEncoder(family.llama)), "clip": params(CLIPTextModel(family.clip))}
    rows = "\n".join(f"| {part} | {family.names[part]} | {counts[part]:,} | {sizes[part]:.2f} MB |" for part in counts)
    hardware = hardware_line()
    minutes = lambda ck: ck["train_seconds"] / 60.0  # noqa: E731
    vae_phases = ", ".join(f"{phase} {ck['step']} steps / {minutes(ck):.1f} min" for phase, ck in vae_ckpts.items())
    transformer = f"{dit_ckpt['step']} steps, {minutes(dit_ckpt):.1f} min"
    if base:  # a fine-tune: the base's record first, then this run's
        vae_phases = ", ".join(f"{phase} {n} steps" for phase, n in base["training"]["vae_steps"].items()) + \
            f" in the base run{', then ' + vae_phases if vae_phases else ''}"
        transformer = f"fine-tuned from the base's {base['training']['dit_steps']}-step transformer " \
                      f"(`{base['from']}`) for {transformer}"
        # One marker for every earlier generation: each command's --run-dir tells them apart.
        commands = ["(base run) " + BASE_RUN_MARKERS.sub("", line) for line in base["commands"]] + commands
    dit_settings = dit_ckpt["settings"]
    size = dit_settings.get("size", 64)
    return f"""# KineFlow tiny HunyuanVideo-family model

A HunyuanVideo-architecture model set (transformer, causal 3D VAE, LLaMA and CLIP text encoders) trained from
scratch on KineFlow's procedural shapes world, in the file layouts of the released HunyuanVideo files, so the
normal loader nodes, `kineflow inspect` and `kineflow eval` read it.

| part | file | parameters | size ({dtype_name}) |
|---|---|---|---|
{rows}

## Intended use

Trying KineFlow's HunyuanVideo pipeline end to end (loaders, Text Encode, Sampler, VAE Decode, Save Video,
`kineflow eval`) on any machine, a CPU included, with videos that follow the prompt. It draws one or two flat
shapes moving over a flat background and nothing else: a test model, not a general text-to-video model.

## Vocabulary

{vocabulary_section(TEXT_ENCODER_TEMPLATES[family.names["llm"]])}
## Recommended settings

{workflow_settings_line("hunyuan_video")}. The transformer last trained on 9-frame clips of {size}x{size} at
flow shift {dit_settings['shift']:g}. It has no guidance embedding, so the Sampler's embedded guidance is ignored;
cfg above 1 is classifier-free guidance against the empty prompt ({dit_settings['caption_dropout']:.0%} of the
training captions were empty). The Evaluation table compares step counts and cfg.

## Limitations

{SHAPES_WORLD_LIMITATIONS}
- Trained on 9-frame clips of {size}x{size} only.

## Evaluation

{scores_section(list(scores)) or NO_SCORES}
## Training data

{training_data_section()}
## Training

- VAE: {vae_phases} (training/README.md explains the phases);
  settings `{json.dumps(vae_settings)}`;
  scaling_factor {float(vae_meta['scaling_factor']):.5f} (1 / latent std {float(vae_meta['kineflow.latent_std']):.4f},
  latent mean {float(vae_meta['kineflow.latent_mean']):.4f}).
- Transformer: {transformer}; settings `{json.dumps(dit_settings)}`.
  Flow matching (velocity ε − x0, timestep σ·1000), trained sigma shift {dit_settings['shift']}; no guidance
  embedding.
- Text encoders: LLaMA ({family.llama.num_hidden_layers} layers, width {family.llama.hidden_size}, word-level
  tokenizer over the caption vocabulary), trained to parse captions and then frozen (`text` stage), and CLIP
  (width {family.clip.hidden_size}) frozen at its seeded random initialisation; the transformer learned to read
  them.
- Hardware: {hardware}. Training time excludes data caching.

Commands of this run (time, command; from `{COMMANDS_FILE}` in the run folder):

""" + "".join(f"    {line}\n" for line in commands or ["(none recorded: the stages were run from Python)"])


# --------------------------------------------------------------------------- CLI
def _add_settings(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        parser.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=type(f.default), default=f.default,
                            help=f"{f.metadata['help']} (default {f.default})", **extra)


def _settings(args: argparse.Namespace, cls, prefix: str = ""):
    return cls(**{f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Stage:
    """One trainer stage of a command line: its sub-command, its settings and the function that runs it."""

    name: str  # sub-command
    prefix: str  # flag prefix of its settings under `all` (e.g. "dit-" -> --dit-steps)
    settings: type
    run: object  # run(run_dir, settings, *, resume, budget) -> StageResult
    help: str
    in_all: bool = True  # part of `all` (a stage that needs an exported model of the run is not)


def stages_of_all(stages: tuple[Stage, ...]) -> list[Stage]:
    """The stages `all` runs, in order."""
    return [stage for stage in stages if stage.in_all]


def build_stage_parser(prog: str, description: str, run_dir: str, stages: tuple[Stage, ...],
                       export_help: str) -> argparse.ArgumentParser:
    """The trainers' shared command line: one sub-command per stage, `export`, and `all` (every stage, then
    export) with each stage's settings under its prefix."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run-dir", default=run_dir, help="folder of checkpoints, caches and logs")
    common.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    common.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop (with a checkpoint) after this much wall time; 0 = no limit")
    common.add_argument("--resume", action="store_true", help="continue the checkpoint in --run-dir")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out", default="weights", help="models folder to export into (ComfyUI sub-folder names)")
    out.add_argument("--export-dtype", default="fp16", choices=tuple(DTYPES), help="dtype of the exported files")
    out.add_argument("--scores", nargs="+", default=[], metavar="REPORT",
                     help="`kineflow eval --json` reports of these weights, quoted as a table in the model card")
    for stage in stages:
        _add_settings(sub.add_parser(stage.name, parents=[common], help=stage.help), stage.settings)
    sub.add_parser("export", parents=[common, out], help=export_help)
    in_all = stages_of_all(stages)
    everything = sub.add_parser("all", parents=[common, out],
                                help=", ".join(stage.name for stage in in_all) + " and export in order")
    for stage in in_all:
        _add_settings(everything, stage.settings, stage.prefix)
    return parser


def run_stage_cli(parser: argparse.ArgumentParser, stages: tuple[Stage, ...], export_fn,
                  argv: list[str] | None) -> int:
    """Parse, record the command in the run folder (the model card lists it), run the chosen stage(s).
    Exit codes: 0 done or stopped by the budget, 2 a KineFlowError, 130 interrupted."""
    args = parser.parse_args(argv)
    command = f"{parser.prog} " + " ".join(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    run_dir, budget = Path(args.run_dir), Budget(args.max_minutes)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / COMMANDS_FILE, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command}\n")
    by_name = {stage.name: stage for stage in stages}
    try:
        if args.stage in by_name:
            stage = by_name[args.stage]
            stage.run(run_dir, _settings(args, stage.settings), resume=args.resume, budget=budget)
            return 0
        if args.stage == "all":
            for stage in stages_of_all(stages):
                settings = _settings(args, stage.settings, stage.prefix.replace("-", "_"))
                if not stage.run(run_dir, settings, resume=args.resume, budget=budget).finished:
                    return 0
        _print_paths(export_fn(run_dir, Path(args.out), args.export_dtype, read_eval_reports(args.scores)))
    except KineFlowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except InterruptedRun as exc:
        sys.stderr.write(f"{exc}\n")
        return 130
    return 0


STAGES = (
    Stage("vae", "vae-", VAESettings, train_vae, "train the VAE"),
    Stage("vae-refine", "refine-", RefineSettings, refine_vae,
          "more decoder training, encoder frozen (can run beside 'dit')"),
    Stage("text", "text-", TextSettings, train_text, "train the LLaMA text encoder to parse captions"),
    Stage("dit", "dit-", DiTSettings, train_dit, "train the transformer"),
    Stage("vae-adapt", "adapt-", AdaptSettings, adapt_vae,
          "adapt the decoder to the transformer's latents (after 'dit' and an export)", in_all=False),
    Stage("lora", "lora-", LoraSettings, _train_lora,
          "a LoRA teaching an exported model a new word (kohya/musubi file in RUN/lora/)", in_all=False),
    Stage("i2v", "i2v-", I2VSettings, _train_i2v,
          "an image-to-video transformer fine-tuned from an exported model (file in RUN/i2v/)", in_all=False),
)


def build_parser() -> argparse.ArgumentParser:
    return build_stage_parser("python -m kineflow.training.train", __doc__.split("\n\n")[0], "runs/tiny_hv", STAGES,
                              "write the shipped weights and model card")


def main(argv: list[str] | None = None) -> int:
    return run_stage_cli(build_parser(), STAGES, export, argv)


def _print_paths(paths: dict[str, Path]) -> None:
    for part, path in paths.items():
        print(f"{part}: {path} ({_size_mb(path):.2f} MB)")


if __name__ == "__main__":
    raise SystemExit(main())
