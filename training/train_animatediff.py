"""Train the tiny AnimateDiff-family model (SD1.5-style UNet + SD VAE + CLIP, and a motion module) on the
procedural shapes dataset, on the CPU, the way AnimateDiff was made: an image model first, then a motion module
trained on videos with the image model frozen.

Stages (each resumable, each writing into one run folder, default `runs/tiny_ad/`):

1. `vae`    - the SD KL-f8 VAE (`tiny_sd.TINY_VAE`) on single frames (the SD VAE codes every frame alone), in the
              three phases that made the HunyuanVideo VAE learn (train.py): encoder against a linear patch
              decoder, decoder on the frozen encoder's latents, then end to end. At the end the weights are
              rounded to the export dtype and the latent std is measured; the measured scale is folded into
              `quant_conv` / `post_quant_conv` so that SD1.5's fixed `scaling_factor` 0.18215, which every SD1.5
              loader applies (ours and ComfyUI's), gives unit-std latents.
2. `text`   - the tiny CLIP (`tiny_sd.TINY_CLIP`: full CLIP-L vocabulary, the shipped BPE tokenizer) trained to
              parse captions into their scene, as train.py's `text` stage trains the LLaMA (a frozen *random*
              text encoder binds colours to the wrong roles), then frozen.
3. `unet`   - the SD1.5 UNet (`tiny_sd.TINY_UNET`, or wider with `--model-channels`) text-to-image on single
              frames: epsilon prediction on AnimateDiff's discrete schedule (β 0.00085 -> 0.012 linear, 1000
              steps, `runtime.animatediff.SCHEDULE`), conditioned as SD is (CLIP's final hidden state of the
              77 padded tokens); the scaled latents of 16-frame clips and their text states are computed once
              (`cache/clips.pt`). 10% of captions are dropped to "" for CFG.
4. `motion` - an AnimateDiff motion module (`tiny_sd.tiny_motion_config`, v2 by default) inserted into the
              frozen UNet, trained with the same objective on whole 16-frame clips (independent noise per frame,
              one timestep and caption per clip). Its `proj_out` layers start at zero, as in AnimateDiff, so
              training starts from the image model. Options train parts of the image model with it: the UNet's
              text cross-attention, the CLIP text encoder (on captions re-drawn in more sentence shapes), or
              the whole UNet.
5. `export` - one LDM single-file checkpoint (`checkpoints/kineflow_tiny_sd15.safetensors`) and the motion module
              under the original AnimateDiff names (`animatediff_models/kineflow_tiny_mm.safetensors`), in fp16,
              plus `MODEL_CARD_ANIMATEDIFF.md` (not MODEL_CARD.md: the HunyuanVideo export writes that one into
              the same folder).

`all` runs them in order under one time budget; with `--resume` it continues whichever stage is unfinished.

    python -m kineflow.training.train_animatediff all --resume --threads 1 --max-minutes 120 --out weights/

The loop, checkpoints, per-step randomness, loss log, progress bar, budget and the VAE's loss terms are
train.py's and common.py's (imported, not copied); training/README.md has measured speeds and commands.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from ..models.animatediff import VERSIONS, MotionModule
from ..models.clip_text import CLIPTextModel
from ..models.sd15_unet import LDM_PREFIX as UNET_PREFIX
from ..models.sd15_unet import SD15UNet, SD15UNetConfig
from ..models.sd_vae import LDM_PREFIX as VAE_PREFIX
from ..models.sd_vae import SDVAE, SDVAEConfig, fit_latent_rgb_factors
from ..models.tokenization import clip_l_tokenizer
from ..runtime.animatediff import CLIP_LENGTH, SCHEDULE, SDTextEncoder, load_sd_checkpoint
from ..errors import KineFlowError
from ..runtime.media import atomic_write
from ..runtime.previews import FACTORS_METADATA_KEY
from ..samplers.schedules import DiscreteSchedule
from ..shapes import dataset as shapes
from ..shapes.shipped import ANIMATEDIFF_CHECKPOINT, TEXT_ENCODER_TEMPLATES
from . import train
from .common import (NO_SCORES, SHAPES_WORLD_LIMITATIONS, Budget, TrainProgress, file_digest, hardware_line,
                     load_checkpoint, scores_section, step_rngs, training_data_section, vocabulary_section,
                     weights_digest, workflow_settings_line)
from .tiny_models import save_safetensors
from .tiny_sd import CLIP_PREFIX, TINY_CLIP, TINY_UNET, TINY_VAE, tiny_motion_config

CLIP_FRAMES = 16  # AnimateDiff's training clip length
RENDER_FRAMES = shapes.frames_to_render(CLIP_FRAMES)  # 17: made for a 4x temporal VAE; the last one is dropped
SD15_SCALING_FACTOR = SDVAEConfig().scaling_factor  # 0.18215, fixed by every SD1.5 loader
NAMES = {"checkpoint": "checkpoints/kineflow_tiny_sd15.safetensors",
         "motion": "animatediff_models/kineflow_tiny_mm.safetensors"}
CARD_NAME = "MODEL_CARD_ANIMATEDIFF.md"
TWO_SHAPE_HELP = "fraction of the cached clips with two shapes (part of the cache's key)"
_opt = train._opt  # settings fields with a help text (turned into CLI flags by train._add_settings)
VAE_PHASES = ("vae_encoder", "vae_decoder", "vae")  # checkpoint folders, in training order

# --------------------------------------------------------------------------- settings
@dataclass
class VAESettings:
    encoder_steps: int = _opt(3000, "phase 1: steps of the encoder against a linear patch decoder")
    encoder_lr: float = _opt(1e-3, "phase 1 Adam learning rate (after a linear warm-up)")
    decoder_steps: int = _opt(3000, "phase 2: steps of the decoder on the frozen encoder's latents")
    decoder_lr: float = _opt(5e-4, "phase 2 Adam learning rate")
    steps: int = _opt(1500, "phase 3: steps of the whole VAE fine-tuned end to end (a resumed run continues up "
                            "to this)")
    lr: float = _opt(2e-4, "phase 3 Adam learning rate")
    batch_size: int = _opt(16, "frames per step (one random frame of as many clips)")
    crop: int = _opt(32, "side of the random square crop trained on (multiple of 8, <= 64)")
    warmup: int = _opt(50, "warm-up steps of each phase")
    foreground_weight: float = _opt(4.0, "extra L1 weight of pixels that differ from the frame's background")
    kl_weight: float = _opt(1e-4, "weight of the mean per-element KL term")
    edge_weight: float = _opt(0.1, "phase 3 weight of the L1 loss on x/y differences (sharp edges)")
    clips: int = _opt(10_000, "size of the training clip index space")
    seed: int = _opt(0, "seed of data order, crops, noise and initialisation")
    dtype: str = _opt("fp16", "export dtype; the final VAE is rounded to it before its latents are measured",
                      choices=tuple(train.DTYPES))
    save_every: int = _opt(100, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")


@dataclass
class TextSettings(train.TextSettings):
    steps: int = _opt(3000, "optimizer steps (a resumed run continues up to this)")


def _check_high_noise_weight(cap: float) -> None:
    if not cap >= 1.0:
        raise KineFlowError(f"--high-noise-weight is a cap on clamp(1/SNR(t), 1, cap) and must be >= 1 (1 = the "
                            f"plain loss); got {cap}")


@dataclass
class UNetSettings:
    steps: int = _opt(6000, "optimizer steps in total (a resumed run continues up to this)")
    batch_size: int = _opt(64, "frames per step (random frames of random cached clips)")
    lr: float = _opt(5e-4, "AdamW learning rate (after a linear warm-up)")
    warmup: int = _opt(100, "warm-up steps")
    clips: int = _opt(2000, "16-frame training clips encoded once into the latent + text cache")
    two_shape_prob: float = _opt(0.25, TWO_SHAPE_HELP)
    caption_dropout: float = _opt(0.1, "probability of training a frame with the empty prompt (for CFG)")
    high_noise_weight: float = _opt(1.0, "cap of the per-frame loss weight 1/SNR(t), floored at 1 (1 = the plain "
                                         "epsilon loss SD was trained with). With the plain loss the tiny UNet's x0 "
                                         "guess at high noise is worse than the mean latent (training/README.md)")
    model_channels: int = _opt(TINY_UNET.model_channels, "width of the UNet's first level (the second is twice it); "
                               "a multiple of 32. The motion module's widths are the UNet's (as in the released "
                               "format), so a wider UNet also gives the motion stage a wider module")
    seed: int = _opt(0, "seed of data order, noise and initialisation")
    save_every: int = _opt(250, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")

    def __post_init__(self):
        _check_high_noise_weight(self.high_noise_weight)
        if self.model_channels < 32 or self.model_channels % 32:
            raise KineFlowError(f"--model-channels must be a positive multiple of 32 (the group norms' 32 groups and "
                                f"8 attention heads must divide it); got {self.model_channels}")


def unet_config(model_channels: int) -> SD15UNetConfig:
    """The tiny UNet at a given first-level width (TINY_UNET's otherwise)."""
    return replace(TINY_UNET, model_channels=model_channels)


@dataclass
class MotionSettings:
    version: str = _opt("v2", "AnimateDiff motion module version (v2 has a mid-block module; v1 shares the "
                              "UNet's group-norm statistics across frames)", choices=VERSIONS)
    steps: int = _opt(3000, "optimizer steps in total (a resumed run continues up to this)")
    batch_size: int = _opt(4, "16-frame clips per step")
    lr: float = _opt(5e-4, "AdamW learning rate (after a linear warm-up)")
    warmup: int = _opt(100, "warm-up steps")
    decay_steps: int = _opt(0, train.DECAY_STEPS_HELP)
    clips: int = _opt(2000, "16-frame training clips (the unet stage's cache is reused when it holds as many)")
    two_shape_prob: float = _opt(0.25, TWO_SHAPE_HELP)
    caption_dropout: float = _opt(0.1, "probability of training a clip with the empty prompt (for CFG)")
    seed: int = _opt(0, "seed of data order, noise and initialisation")
    dtype: str = _opt("fp16", "export dtype; the frozen UNet is rounded to it before the motion module trains",
                      choices=tuple(train.DTYPES))
    cross_attention: str = _opt("frozen", "'trained': the UNet's text cross-attention layers (attn2) train with the "
                                          "motion module and are exported into the checkpoint. The motion module "
                                          "never sees the prompt; a UNet trained on single frames has no reason to "
                                          "pass motion words on, so this is how they reach it",
                                choices=("frozen", "trained"))
    unet: str = _opt("frozen", "'trained': every layer of the UNet trains with the motion module and is exported into "
                               "the checkpoint, as if its convolutions had to learn to displace what they draw "
                               "(AnimateDiff keeps the image model frozen; training/README.md has what this measured). "
                               "Implies --cross-attention trained",
                     choices=("frozen", "trained"))
    high_noise_weight: float = _opt(1.0, "cap of the per-clip loss weight 1/SNR(t), floored at 1 (1 = AnimateDiff's "
                                         "plain epsilon loss). The high-noise steps decide where each frame's shape "
                                         "is, and the plain loss hardly rewards them (training/README.md)")
    base_checkpoint: str = _opt("", "path of an SD1.5 LDM checkpoint to animate instead of this run's vae, text and "
                                    "unet stages (its UNet, VAE and CLIP)")
    init_module: str = _opt("", "continue training an exported motion module file (e.g. on a new, larger cache) "
                                "instead of starting from a zero proj_out; pair it with the --base-checkpoint "
                                "exported beside it, whose attn2 layers trained with it")
    caption_templates: str = _opt("train", "'extended': each step re-captions its clips from the training and the "
                                           "extra training sentence templates (dataset.py) and encodes them with "
                                           "the CLIP (frozen, or trained with --text-encoder) instead of using the "
                                           "cached caption (always a training template), so the text pathway sees "
                                           "more than seven sentence shapes (training/README.md)",
                                  choices=("train", "extended"))
    text_encoder: str = _opt("frozen", "'trained': the CLIP text encoder trains with the motion module (captions "
                                       "and the empty prompt encoded each step) and is exported into the "
                                       "checkpoint. Implies --cross-attention trained", choices=("frozen", "trained"))
    save_every: int = _opt(250, "checkpoint every N steps")
    log_every: int = _opt(10, "loss log line every N steps")

    def __post_init__(self):
        _check_high_noise_weight(self.high_noise_weight)
        if self.text_encoder == "trained":  # CLIP's new states are read through attn2, so it must follow them
            self.cross_attention = "trained"


# --------------------------------------------------------------------------- stage 1: VAE
class PatchDecoder(torch.nn.Module):
    """Phase 1's stand-in decoder: a 1x1 conv from each latent pixel to its s x s x 3 pixels, pixel-shuffled
    (train.PatchDecoder for a per-frame VAE)."""

    def __init__(self, vae: SDVAE):
        super().__init__()
        c = vae.config
        self.s = c.downscale
        self.proj = torch.nn.Conv2d(c.z_channels, c.in_channels * self.s * self.s, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(z), self.s)


def frame_loss(recon: torch.Tensor, frames: torch.Tensor, settings: VAESettings, edges: bool = False) -> torch.Tensor:
    """train.recon_loss (foreground-weighted L1) on images [B, 3, H, W]; with `edges`, plus the L1 of the x/y
    differences (phase 3 only: from scratch it pulls the output flat)."""
    loss = train.recon_loss(recon[:, :, None], frames[:, :, None], settings)
    if edges and settings.edge_weight:
        diffs = sum((recon.diff(dim=d) - frames.diff(dim=d)).abs().mean() for d in (2, 3))
        loss = loss + settings.edge_weight * diffs
    return loss


def encoder_loss(vae: SDVAE, head: PatchDecoder, frames, gen, settings: VAESettings) -> torch.Tensor:
    posterior = vae.encode(frames)
    recon = head(train.posterior_sample(posterior, gen))
    return frame_loss(recon, frames, settings) + settings.kl_weight * train.kl_loss(posterior)


def decoder_loss(vae: SDVAE, frames, gen, settings: VAESettings) -> torch.Tensor:
    with torch.no_grad():
        z = train.posterior_sample(vae.encode(frames), gen)
    return frame_loss(vae.decode(z), frames, settings)


def vae_loss(vae: SDVAE, frames, gen, settings: VAESettings) -> torch.Tensor:
    posterior = vae.encode(frames)
    recon = vae.decode(train.posterior_sample(posterior, gen))
    return frame_loss(recon, frames, settings, edges=True) + settings.kl_weight * train.kl_loss(posterior)


def frame_batch(data: shapes.ShapesVideoDataset, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    """One random frame of each of `batch` random clips, randomly cropped: [B, 3, crop, crop] in -1..1."""
    video, _ = train.video_batch(data, rng.integers(0, len(data), batch))
    frames = video[torch.arange(batch), :, torch.as_tensor(rng.integers(0, video.shape[2], batch))]
    return train.random_crops(frames[:, :, None], crop, rng)[:, :, 0]


def vae_path(run_dir: Path) -> Path:
    return Path(run_dir) / "vae" / "vae.safetensors"


def train_vae(run_dir: Path, settings: VAESettings, *, resume: bool = False,
              budget: Budget | None = None) -> train.StageResult:
    """The three phases in order, each with its own checkpoint folder (`vae_encoder/`, `vae_decoder/`, `vae/`),
    then `finalize_vae`. Re-running with `resume` replays finished phases and continues the unfinished one."""
    run_dir, budget = Path(run_dir), budget or Budget()
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train")
    torch.manual_seed(settings.seed)
    vae = SDVAE(TINY_VAE)
    head = PatchDecoder(vae)
    phases = (  # names as in VAE_PHASES
        ("vae_encoder", torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv, "head": head}),
         settings.encoder_steps, settings.encoder_lr, lambda x, gen: encoder_loss(vae, head, x, gen, settings)),
        ("vae_decoder", torch.nn.ModuleDict({"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}),
         settings.decoder_steps, settings.decoder_lr, lambda x, gen: decoder_loss(vae, x, gen, settings)),
        ("vae", vae, settings.steps, settings.lr, lambda x, gen: vae_loss(vae, x, gen, settings)),
    )
    result = None
    for stage, trained, steps, lr, loss_of in phases:
        def loss_fn(step: int, stage=stage, loss_of=loss_of) -> torch.Tensor:
            rng, gen = step_rngs(settings.seed, stage, step)
            return loss_of(frame_batch(data, rng, settings.batch_size, settings.crop), gen)

        optimizer = torch.optim.Adam(trained.parameters(), lr=lr)
        result = train.run_loop(stage, run_dir, trained, optimizer, loss_fn, settings, steps=steps, lr=lr,
                                resume=resume, budget=budget)
        if not result.finished:
            return result
    if result.steps_run or not vae_path(run_dir).exists():
        finalize_vae(run_dir, vae, data, settings)
    return result


def fold_latent_scale(vae: SDVAE, k: float) -> SDVAE:
    """Make the VAE's unscaled latents k times larger without changing what it reconstructs: the posterior mean
    rows of `quant_conv` scale by k (its log-variance rows shift by 2 ln k) and `post_quant_conv` divides its
    input by k. Exact up to rounding."""
    z = vae.config.z_channels
    with torch.no_grad():
        vae.quant_conv.weight[:z] *= k
        vae.quant_conv.bias[:z] *= k
        vae.quant_conv.bias[z:] += 2.0 * math.log(k)
        vae.post_quant_conv.weight /= k
    return vae


def _fit_frames(data: shapes.ShapesVideoDataset, settings: VAESettings) -> list[torch.Tensor]:
    """Every frame of train.FIT_CLIPS full-size clips, in batches of [N, 3, 64, 64]."""
    rng, _ = step_rngs(settings.seed, "fit", 0)
    indices = rng.choice(settings.clips, size=min(train.FIT_CLIPS, settings.clips), replace=False)
    return [train.video_batch(data, indices[i:i + 4])[0].transpose(1, 2).flatten(0, 1)
            for i in range(0, len(indices), 4)]


def latent_std(vae: SDVAE, frames: list[torch.Tensor]) -> tuple[float, float]:
    """(std, mean) of the unscaled posterior means of `frames`."""
    with torch.no_grad():
        latents = torch.cat([vae.encode(f).mean for f in frames])
    return latents.std().item(), latents.mean().item()


def finalize_vae(run_dir: Path, vae: SDVAE, data: shapes.ShapesVideoDataset, settings: VAESettings) -> Path:
    """Round to the export dtype, fold 1 / (std x 0.18215) into the latent convs (so SD1.5's scaling factor gives
    unit-std latents), round again, save `vae/vae.safetensors` with the measurements in its metadata."""
    dtype = train.DTYPES[settings.dtype]
    train.round_to(vae, dtype).eval()
    frames = _fit_frames(data, settings)
    raw_std, raw_mean = latent_std(vae, frames)
    fold = 1.0 / (raw_std * SD15_SCALING_FACTOR)
    train.round_to(fold_latent_scale(vae, fold), dtype)
    std, mean = latent_std(vae, frames)
    return save_safetensors(vae.state_dict(), vae_path(run_dir), {
        "scaling_factor": SD15_SCALING_FACTOR, "kineflow.latent_fold": fold,
        "kineflow.latent_std_before_fold": raw_std, "kineflow.latent_mean_before_fold": raw_mean,
        "kineflow.scaled_latent_std": std * SD15_SCALING_FACTOR,
        "kineflow.scaled_latent_mean": mean * SD15_SCALING_FACTOR})


def preview_factors_metadata(vae: SDVAE, seed: int, clips: int) -> str:
    """The checkpoint metadata entry of the Sampler's live preview for this VAE (runtime/previews.py): latent -> RGB
    factors fitted on every frame of train.FIT_CLIPS clips of the train split the VAE trained on (its seed and
    clip count)."""
    data = shapes.ShapesVideoDataset(length=clips, seed=seed, split="train")
    factors, bias = fit_latent_rgb_factors(vae, _fit_frames(data, VAESettings(seed=seed, clips=clips)))
    return json.dumps({"factors": factors.tolist(), "bias": bias.tolist()})


def load_trained_vae(run_dir: Path) -> tuple[SDVAE, dict]:
    path = vae_path(run_dir)
    if not path.exists():
        raise KineFlowError(f"no trained VAE at {path}; run the 'vae' stage to the end first")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    vae = SDVAE(TINY_VAE)
    vae.load_state_dict(load_file(str(path)))
    return vae.eval().requires_grad_(False), metadata


# --------------------------------------------------------------------------- stage 2: text encoder, cache
def clip_path(run_dir: Path) -> Path:
    return Path(run_dir) / "text" / "clip.safetensors"


def clip_states(clip: CLIPTextModel, tokenizer, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's final hidden states of the captions as the UNet reads them (77 positions), and the real-token mask."""
    ids, mask = tokenizer.encode(captions, CLIP_LENGTH)
    return clip(ids).last_hidden_state, mask


def train_text(run_dir: Path, settings: TextSettings, *, resume: bool = False,
               budget: Budget | None = None) -> train.StageResult:
    """Stage `text`: train the tiny CLIP to parse captions into their scene (train.py's `text` stage, read through
    CLIP) and save it to text/clip.safetensors, where the unet stage reads it frozen."""
    run_dir = Path(run_dir)
    torch.manual_seed(settings.seed)
    clip, tokenizer = CLIPTextModel(TINY_CLIP), clip_l_tokenizer()
    result, accuracy = train.train_scene_parser("text", run_dir, "clip", clip,
                                                lambda captions: clip_states(clip, tokenizer, captions),
                                                TINY_CLIP.hidden_size, settings, resume=resume, budget=budget)
    if accuracy and (result.steps_run or not clip_path(run_dir).exists()):
        save_safetensors(clip.state_dict(), clip_path(run_dir),
                         {"kineflow.heldout_scene_accuracy": json.dumps(accuracy)})
    return result


def prepare_text_encoder(run_dir: Path) -> SDTextEncoder:
    """The run's trained CLIP (frozen), with the shipped CLIP-L tokenizer, wrapped as the runtime's SD1.5 text
    encoder so training reads it as sampling does."""
    path = clip_path(run_dir)
    if not path.exists():
        raise KineFlowError(f"no trained CLIP at {path}; run the 'text' stage first")
    clip = CLIPTextModel(TINY_CLIP)
    clip.load_state_dict(load_file(str(path)))
    return SDTextEncoder(clip=clip.eval().requires_grad_(False), tokenizer=clip_l_tokenizer(), source=str(path))


def cache_path(run_dir: Path) -> Path:
    return Path(run_dir) / "cache" / "clips.pt"


def build_cache(run_dir: Path, settings, vae: SDVAE, encoder: SDTextEncoder, batch: int = 8) -> dict:
    """Scaled latents [N, 4, 16, 8, 8] (posterior means) and text states [N, 77, D] of the first `clips` training
    clips, plus the empty prompt's. Shared by the unet and motion stages: a cache of more clips serves a request
    for fewer (clip i depends only on the seed and i). Keyed by the VAE's and CLIP's weights (not the files they
    came from), so a checkpoint whose UNet trained further (an --init-module's base) reuses the cache."""
    path, clips = cache_path(run_dir), settings.clips
    key = {"seed": settings.seed, "frames": CLIP_FRAMES, "dataset": shapes.DATASET_VERSION,
           "two_shape_prob": settings.two_shape_prob,
           "vae": weights_digest(vae), "clip": weights_digest(encoder.clip)}
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
        if cache["key"] == key and len(cache["latents"]) >= clips:
            return {k: v[:clips] if k in ("latents", "context", "captions") else v for k, v in cache.items()}
    data = shapes.ShapesVideoDataset(length=clips, seed=settings.seed, split="train", frames=RENDER_FRAMES,
                                     two_shape_prob=settings.two_shape_prob)
    latents, contexts, captions = [], [], []
    bar = TrainProgress("cache", 0, clips)
    with torch.no_grad():
        for start in range(0, clips, batch):
            video, texts = train.video_batch(data, range(start, min(start + batch, clips)))
            latents.append(vae.encode_frames(video[:, :, :CLIP_FRAMES], batch=4 * CLIP_FRAMES))
            contexts.append(encoder.encode(texts)["context"])
            captions += texts
            bar.update(start + len(texts))
        bar.close()
        uncond = encoder.encode([""])["context"]
    cache = {"key": key, "latents": torch.cat(latents), "context": torch.cat(contexts), "uncond": uncond,
             "captions": captions}
    with atomic_write(path) as tmp:
        torch.save(cache, tmp)
    return cache


def run_vae_and_text_encoder(run_dir: Path) -> tuple[SDVAE, SDTextEncoder]:
    """The run's own trained VAE and (frozen) text encoder, what its cache is made with."""
    return load_trained_vae(run_dir)[0], prepare_text_encoder(run_dir)


# --------------------------------------------------------------------------- stages 3 + 4: UNet, motion module
_SCHEDULE = DiscreteSchedule(**SCHEDULE)
ALPHAS_CUMPROD = _SCHEDULE.alphas_cumprod.float()


def noised(x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM forward process x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε (what DiscreteEpsilon inverts when sampling)."""
    a = ALPHAS_CUMPROD[timesteps].view(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def _contexts(cache: dict, idx: torch.Tensor, gen: torch.Generator, dropout: float,
              states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The clips' caption states, each replaced by the empty prompt's with probability `dropout`; `states` =
    (captions', empty prompt's) replaces the cached ones."""
    drop = torch.rand(len(idx), generator=gen) < dropout
    context, uncond = (cache["context"][idx], cache["uncond"]) if states is None else states
    return torch.where(drop.view(-1, 1, 1), uncond.expand_as(context), context)


def unet_loss(unet: SD15UNet, cache: dict, clips, frames, gen: torch.Generator, settings: UNetSettings) -> torch.Tensor:
    """Epsilon MSE on single frames (`frames[i]` of cached clip `clips[i]`); dropped captions use ""."""
    idx = torch.as_tensor(np.asarray(clips), dtype=torch.long)
    x0 = cache["latents"][idx, :, torch.as_tensor(np.asarray(frames), dtype=torch.long)]
    timesteps = torch.randint(0, len(ALPHAS_CUMPROD), (len(idx),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    context = _contexts(cache, idx, gen, settings.caption_dropout)
    pred = unet(noised(x0, timesteps, noise), timesteps.float(), context)
    return weighted_mse(pred, noise, timesteps, settings.high_noise_weight)


def motion_loss(unet: SD15UNet, motion: MotionModule, cache: dict, clips, gen: torch.Generator,
                settings: MotionSettings, states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Epsilon MSE on whole clips through the UNet with the motion module: one timestep and caption per clip
    (`states`, the clips' and the empty prompt's text states, default to the cached ones), independent noise per
    frame; the B*F frames go through the UNet as one batch, clip by clip (as net_fn)."""
    idx = torch.as_tensor(np.asarray(clips), dtype=torch.long)
    x0 = cache["latents"][idx]
    b, c, f, h, w = x0.shape
    timesteps = torch.randint(0, len(ALPHAS_CUMPROD), (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    context = _contexts(cache, idx, gen, settings.caption_dropout, states)
    x_t = noised(x0, timesteps, noise).transpose(1, 2).reshape(b * f, c, h, w)
    pred = unet(x_t, timesteps.float().repeat_interleave(f), context.repeat_interleave(f, dim=0), video_frames=f,
                temporal=motion)
    target = noise.transpose(1, 2).reshape(b * f, c, h, w)
    return weighted_mse(pred.reshape(b, -1), target.reshape(b, -1), timesteps, settings.high_noise_weight)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, cap: float) -> torch.Tensor:
    """MSE of each sample (dim 0) weighted by `high_noise_weights`, normalised by the weights' sum."""
    per_sample = (pred.float() - target).square().flatten(1).mean(dim=1)
    weights = high_noise_weights(timesteps, cap)
    return (weights * per_sample).sum() / weights.sum()


def high_noise_weights(timesteps: torch.Tensor, cap: float) -> torch.Tensor:
    """clamp(1/SNR(t), 1, cap): an epsilon error at timestep t is a 1/SNR(t) times larger x0 error, so this
    counts high-noise errors closer to what they cost the clip (cap 1: all equal)."""
    a = ALPHAS_CUMPROD[timesteps]
    return ((1.0 - a) / a).clamp(1.0, cap)


def checkpoint_path(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / stage / "ckpt.pt"


def train_unet(run_dir: Path, settings: UNetSettings, *, resume: bool = False,
               budget: Budget | None = None) -> train.StageResult:
    run_dir = Path(run_dir)
    cache = build_cache(run_dir, settings, *run_vae_and_text_encoder(run_dir))
    torch.manual_seed(settings.seed)
    unet = SD15UNet(unet_config(settings.model_channels))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=0.0)
    n, f = cache["latents"].shape[0], cache["latents"].shape[2]

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = step_rngs(settings.seed, "unet", step)
        clips, frames = rng.integers(0, n, settings.batch_size), rng.integers(0, f, settings.batch_size)
        return unet_loss(unet, cache, clips, frames, gen, settings)

    return train.run_loop("unet", run_dir, unet, optimizer, loss_fn, settings, resume=resume,
                          budget=budget or Budget())


def load_trained_unet(run_dir: Path, dtype: torch.dtype | None = None) -> tuple[SD15UNet, dict]:
    """The UNet of a finished unet stage (rounded to `dtype` if given) and its checkpoint."""
    path = checkpoint_path(run_dir, "unet")
    if not path.exists():
        raise KineFlowError(f"no UNet checkpoint at {path}; run the 'unet' stage first")
    ckpt = load_checkpoint(path)
    if ckpt["step"] < ckpt["settings"]["steps"]:
        raise KineFlowError(f"the UNet at {path} stopped at step {ckpt['step']} of {ckpt['settings']['steps']}; "
                            "finish the 'unet' stage with --resume (or resume it with --steps set to the step it "
                            "reached) first")
    unet = SD15UNet(unet_config(UNetSettings(**ckpt["settings"]).model_channels))
    unet.load_state_dict(ckpt["model"])
    if dtype is not None:
        train.round_to(unet, dtype)
    return unet.eval().requires_grad_(False), ckpt


def load_base_checkpoint(path: str | Path) -> tuple[SD15UNet, SDVAE, SDTextEncoder]:
    """UNet, VAE and text encoder of an SD1.5 LDM checkpoint file, in float32, frozen."""
    if not Path(path).is_file():
        raise KineFlowError(f"--base-checkpoint {str(path)!r} is not a file; expected an SD1.5 LDM checkpoint")
    model, vae, text = load_sd_checkpoint(str(Path(path).resolve()), dtype_name="fp32")
    text.clip.eval().requires_grad_(False)
    return model.unet.eval().requires_grad_(False), vae.vae.eval().requires_grad_(False), text


def motion_parts(trained: torch.nn.Module) -> tuple[MotionModule, SD15UNet | None]:
    """The motion module (and the UNet whose cross-attention trained with it, if it did) of a motion stage model."""
    if isinstance(trained, MotionModule):
        return trained, None
    return trained["motion"], trained["unet"]


def motion_stage_model(settings: MotionSettings, unet: SD15UNet, clip: CLIPTextModel) -> torch.nn.Module:
    """What the motion stage optimises and checkpoints: the motion module alone, or with `cross_attention` or
    `unet` trained, {"motion": module, "unet": UNet whose attn2 layers (or all layers) require grad}, plus
    "clip" (trainable) with `text_encoder` trained."""
    widths = tuple(unet.config.level_channels())
    motion = MotionModule(tiny_motion_config(settings.version, widths))  # proj_out zero-initialised
    if settings.unet == "trained":
        unet.requires_grad_(True)
    elif settings.cross_attention == "trained":
        for name, module in unet.named_modules():
            if name.endswith(".attn2"):
                module.requires_grad_(True)
    else:
        return motion
    parts = {"motion": motion, "unet": unet}
    if settings.text_encoder == "trained":
        parts["clip"] = clip.requires_grad_(True)
    return torch.nn.ModuleDict(parts)


def load_init_module(motion: MotionModule, path: Path, version: str) -> None:
    """Load an exported motion module file into the stage's fresh module, refusing files of another shape."""
    if not path.is_file():
        raise KineFlowError(f"--init-module {str(path)!r} is not a file; expected a motion module exported by this "
                            f"stage ({NAMES['motion']})")
    state = load_file(str(path))
    expected = {k: tuple(v.shape) for k, v in motion.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or sorted(k for k in found if found[k] != expected[k])
        raise KineFlowError(f"--init-module {path}: expected the tiny {version} motion module of this stage "
                            f"({len(expected)} tensors), found {len(found)} tensors that differ from it, "
                            f"e.g. {differ[:3]}")
    motion.load_state_dict(state)


@dataclass
class CaptionStates:
    """Text states computed each step instead of read from the cache. With `--caption-templates extended` the
    clips are re-captioned: clip i's scene is regenerated from the cache's dataset (seed, i) and a caption drawn
    from the extended templates; otherwise the cached caption is used. With `--text-encoder trained` the states
    carry gradients and the empty prompt's are recomputed too (CFG reads them through the trained encoder)."""
    settings: MotionSettings
    encoder: SDTextEncoder
    cache: dict

    def __post_init__(self):
        self.data = shapes.ShapesVideoDataset(length=self.settings.clips, seed=self.settings.seed, split="train",
                                              frames=RENDER_FRAMES, two_shape_prob=self.settings.two_shape_prob)

    def captions(self, clips, rng: np.random.Generator) -> list[str]:
        if self.settings.caption_templates == "train":
            return [self.cache["captions"][int(i)] for i in clips]
        specs = [self.data.spec_and_caption(int(i))[0] for i in clips]
        return [shapes.caption(spec, rng, self.settings.caption_templates) for spec in specs]

    def states(self, clips, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(the clips' caption states [B, 77, D], the empty prompt's [1, 77, D])."""
        captions = self.captions(clips, rng)
        if self.settings.text_encoder == "frozen":  # the cached empty prompt is still what this CLIP gives
            with torch.no_grad():
                return clip_states(self.encoder.clip, self.encoder.tokenizer, captions)[0], self.cache["uncond"]
        states, _ = clip_states(self.encoder.clip, self.encoder.tokenizer, captions + [""])
        return states[:-1], states[-1:]


def train_motion(run_dir: Path, settings: MotionSettings, *, resume: bool = False,
                 budget: Budget | None = None) -> train.StageResult:
    run_dir = Path(run_dir)
    if settings.base_checkpoint:
        unet, vae, encoder = load_base_checkpoint(settings.base_checkpoint)
    else:
        unet, _ = load_trained_unet(run_dir, train.DTYPES[settings.dtype])
        vae, encoder = run_vae_and_text_encoder(run_dir)
    cache = build_cache(run_dir, settings, vae, encoder)
    live = settings.caption_templates != "train" or settings.text_encoder == "trained"
    captions = CaptionStates(settings, encoder, cache) if live else None
    torch.manual_seed(settings.seed)
    trained = motion_stage_model(settings, unet, encoder.clip)
    motion, _ = motion_parts(trained)
    if settings.init_module:  # a resumed run then loads its checkpoint over these
        load_init_module(motion, Path(settings.init_module), settings.version)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0)
    n = len(cache["latents"])

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = step_rngs(settings.seed, "motion", step)
        clips = rng.integers(0, n, settings.batch_size)
        states = captions.states(clips, rng) if captions else None
        return motion_loss(unet, motion, cache, clips, gen, settings, states)

    return train.run_loop("motion", run_dir, trained, optimizer, loss_fn, settings, resume=resume,
                          budget=budget or Budget())


# --------------------------------------------------------------------------- stage 5: export
def export(run_dir: Path, out: Path, dtype_name: str = "fp16", scores: list[dict] = ()) -> dict[str, Path]:
    """Write the LDM checkpoint, the motion module and the model card (quoting the eval reports `scores`) under
    `out`; returns their paths."""
    run_dir, out = Path(run_dir), Path(out)
    motion_ckpt_path = checkpoint_path(run_dir, "motion")
    if not motion_ckpt_path.exists():
        raise KineFlowError(f"no motion module checkpoint at {motion_ckpt_path}; run the 'motion' stage first")
    motion_ckpt = load_checkpoint(motion_ckpt_path)
    settings = MotionSettings(**motion_ckpt["settings"])
    if settings.base_checkpoint:
        unet, vae, encoder = load_base_checkpoint(settings.base_checkpoint)
        clip, image_notes, record = encoder.clip, *_base_image_notes(Path(settings.base_checkpoint))
    else:
        unet, unet_ckpt = load_trained_unet(run_dir)
        vae, vae_meta = load_trained_vae(run_dir)
        clip = prepare_text_encoder(run_dir).clip
        image_notes, record = _run_image_notes(run_dir, unet_ckpt, vae_meta)
    trained = motion_stage_model(settings, unet, clip)
    trained.load_state_dict(motion_ckpt["model"])
    motion, _ = motion_parts(trained)
    dtype = train.DTYPES[dtype_name]
    cast = lambda prefix, m: {prefix + k: v.to(dtype) if v.is_floating_point() else v
                              for k, v in m.state_dict().items()}
    earlier = motion_history(Path(settings.init_module)) if settings.init_module else []
    training = {**record, "motion_steps": motion_ckpt["step"], "motion": motion_ckpt["settings"]}
    checkpoint_meta = {"kineflow.training": json.dumps(training)}
    if "vae" in record:  # a VAE KineFlow trained (here or in the base's run): fit its preview factors
        checkpoint_meta[FACTORS_METADATA_KEY] = preview_factors_metadata(
            train.round_to(vae, dtype), record["vae"]["seed"], record["vae"]["clips"])
    paths = {
        "checkpoint": save_safetensors({**cast(UNET_PREFIX, unet), **cast(VAE_PREFIX, vae), **cast(CLIP_PREFIX, clip)},
                                       out / NAMES["checkpoint"], checkpoint_meta),
        "motion": save_safetensors(cast("", motion), out / NAMES["motion"],
                                   {"kineflow.training": json.dumps({"motion_steps": motion_ckpt["step"],
                                                                     "motion": motion_ckpt["settings"],
                                                                     "earlier": earlier})}),
    }
    sizes = {part: train._size_mb(path) for part, path in paths.items()}
    commands_file = run_dir / train.COMMANDS_FILE
    commands = commands_file.read_text().splitlines() if commands_file.exists() else []
    card = model_card({"unet": unet, "vae": vae, "clip": clip, "motion": motion}, image_notes, motion_ckpt, sizes,
                      dtype_name, commands, earlier, list(scores))
    with atomic_write(out / CARD_NAME) as tmp:
        tmp.write_text(card)
    total = sum(sizes.values())
    if total > train.SIZE_LIMIT_MB:
        sys.stderr.write(f"warning: the exported weights take {total:.1f} MB, more than the "
                         f"{train.SIZE_LIMIT_MB} MB budget\n")
    return {**paths, "card": out / CARD_NAME}


def _training_record(path: Path) -> dict:
    """The training record KineFlow's exports embed in a safetensors file (metadata `kineflow.training`), `{}` for
    other files."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("kineflow.training", "{}"))


def motion_history(path: Path) -> list[dict]:
    """The motion runs an exported module embodies, newest first, as `{"motion_steps", "motion"}` records: the
    module's own, then those of the module its run started from (`--init-module`). Each export embeds the chain
    (`earlier`), so it outlives the files it came from; an older export without one is followed through its
    `init_module` path while that file exists. A missing `path` has no history to tell."""
    record = _training_record(path) if path.is_file() else {}
    if "motion" not in record:
        return []
    own = {"motion_steps": record["motion_steps"], "motion": record["motion"]}
    if "earlier" in record:
        return [own, *record["earlier"]]
    init = record["motion"].get("init_module")
    return [own, *(motion_history(Path(init)) if init else [])]


def _minutes(ckpt: dict) -> float:
    return ckpt["train_seconds"] / 60.0


def _run_image_notes(run_dir: Path, unet_ckpt: dict, vae_meta: dict) -> tuple[str, dict]:
    """The model card's lines on an image model trained in this run, and its training record."""
    with safe_open(str(clip_path(run_dir)), "pt") as f:
        text_accuracy = f.metadata()["kineflow.heldout_scene_accuracy"]
    text_ckpt = load_checkpoint(checkpoint_path(run_dir, "text"))
    vae_ckpts = {phase: load_checkpoint(checkpoint_path(run_dir, phase)) for phase in VAE_PHASES}
    vae_phases = ", ".join(f"{phase} {ck['step']} steps / {_minutes(ck):.1f} min" for phase, ck in vae_ckpts.items())
    record = {"vae_steps": {p: ck["step"] for p, ck in vae_ckpts.items()}, "text_steps": text_ckpt["step"],
              "unet_steps": unet_ckpt["step"], "vae": vae_ckpts["vae"]["settings"], "text": text_ckpt["settings"],
              "unet": unet_ckpt["settings"]}
    notes = f"""- VAE (SD KL-f8, per frame): {vae_phases} (training/README.md explains the phases); settings
  `{json.dumps(vae_ckpts['vae']['settings'])}`. Its latent scale is folded into `quant_conv`/`post_quant_conv` so
  that SD1.5's scaling_factor {SD15_SCALING_FACTOR} gives latents of std
  {float(vae_meta['kineflow.scaled_latent_std']):.4f} (mean {float(vae_meta['kineflow.scaled_latent_mean']):.4f}).
- UNet: {unet_ckpt['step']} steps, {_minutes(unet_ckpt):.1f} min; settings `{json.dumps(unet_ckpt['settings'])}`.
  Epsilon prediction, discrete schedule β {SCHEDULE['beta_start']} -> {SCHEDULE['beta_end']} linear over
  {SCHEDULE['num_train_timesteps']} steps (AnimateDiff's), 10% empty captions for CFG.
- Text encoder: CLIP (width {TINY_CLIP.hidden_size}, {TINY_CLIP.num_hidden_layers} layers, the full CLIP-L vocabulary
  and tokenizer) trained to parse captions ({text_ckpt['step']} steps, {_minutes(text_ckpt):.1f} min; held-out
  captions read right: {text_accuracy}), then frozen; the UNet learned to read it.
"""
    return notes, record


def _base_image_notes(base: Path) -> tuple[str, dict]:
    """The model card's lines on an image model taken from an existing checkpoint, and its training record (the
    one KineFlow's export embeds, `{}` for other files)."""
    record = _training_record(base)
    image = {key: record[key] for key in ("vae_steps", "text_steps", "unet_steps", "vae", "text", "unet")
             if key in record}
    notes = f"""- Image model (UNet, VAE, CLIP text encoder): taken from `{base.name}` (sha256
  {file_digest(base)[:16]}...); its training record: `{json.dumps(image) if image else "none embedded"}`.
"""
    return notes, {"image_model": base.name, **image}


def model_card(models: dict, image_notes: str, motion_ckpt: dict, sizes: dict, dtype_name: str,
               commands: list[str], earlier: list[dict] = (), scores: list[dict] = ()) -> str:
    params = {part: sum(p.numel() for p in m.parameters()) for part, m in models.items()}
    hardware = hardware_line()
    settings = motion_ckpt["settings"]
    version = settings["version"]
    sd_params = " / ".join(f"{params[part]:,}" for part in ("unet", "vae", "clip"))
    rows = (f"| `{NAMES['checkpoint']}` | UNet / VAE / CLIP text | {sd_params} | {sizes['checkpoint']:.2f} MB |\n"
            f"| `{NAMES['motion']}` | AnimateDiff {version} motion module | {params['motion']:,} | "
            f"{sizes['motion']:.2f} MB |")
    if settings.get("unet", "frozen") == "trained":
        frozen = "the whole UNet training with it (saved in the checkpoint), unlike AnimateDiff's frozen image model"
    elif settings.get("cross_attention", "frozen") == "trained":
        frozen = ("the UNet frozen except its text cross-attention layers (attn2), which trained with it and are "
                  "saved in the checkpoint")
    else:
        frozen = "the UNet frozen"
    if settings.get("text_encoder", "frozen") == "trained":
        frozen += "; the CLIP text encoder trained with it too (saved in the checkpoint)"
    start, history = "proj_out zero-initialised", ""
    if settings.get("init_module"):
        start = "started from the exported module named in init_module (its runs: below)"
        total = motion_ckpt["step"] + sum(run["motion_steps"] for run in earlier)
        runs = "".join(f"  - {run['motion_steps']} steps, settings `{json.dumps(run['motion'])}`\n" for run in earlier)
        history = (f"- Earlier motion runs this module continues, newest first ({total} motion steps in all with "
                   f"this one):\n" + (runs or "  (not recorded: the init module's file was not found)\n"))
    return f"""# KineFlow tiny AnimateDiff-family model

An SD1.5-architecture checkpoint (UNet, SD VAE, CLIP text encoder) and an AnimateDiff {version} motion module,
trained from scratch on KineFlow's procedural shapes world the AnimateDiff way (an image model on single frames,
then a motion module on {CLIP_FRAMES}-frame clips), in the file layouts of released SD1.5 checkpoints and motion
modules, so Load SD Checkpoint, Load Motion Module, `kineflow inspect` and `kineflow eval` read them.

| file | parts | parameters | size ({dtype_name}) |
|---|---|---|---|
{rows}

## Intended use

Trying KineFlow's AnimateDiff pipeline end to end (Load SD Checkpoint, Load Motion Module, Apply Motion Module,
Text Encode, Sampler, VAE Decode, Save Video, `kineflow eval`) on any machine, a CPU included, with videos that
follow the prompt. It draws one or two flat shapes moving over a flat background and nothing else: a test model,
not a general text-to-video model.

## Vocabulary

{vocabulary_section(TEXT_ENCODER_TEMPLATES[ANIMATEDIFF_CHECKPOINT])}
## Recommended settings

Load SD Checkpoint (prediction eps) -> Load Motion Module -> Apply Motion Module.
{workflow_settings_line("animatediff")}. The model trained on {CLIP_FRAMES}-frame clips of 64x64
with {settings['caption_dropout']:.0%} of the captions empty, the unconditional branch that cfg above 1 pushes away
from.

## Limitations

{SHAPES_WORLD_LIMITATIONS}
- Trained on {CLIP_FRAMES}-frame clips of 64x64 only. Without the motion module the image model
  draws each frame on its own: the shapes do not move as the prompt says.

## Evaluation

{scores_section(list(scores)) or NO_SCORES}
## Training data

{training_data_section()}
## Training

{image_notes}- Motion module ({version}): {motion_ckpt['step']} steps, {_minutes(motion_ckpt):.1f} min; settings
  `{json.dumps(settings)}`; trained on {CLIP_FRAMES}-frame clips with {frozen}; {start}.
{history}- Hardware: {hardware}. Training time excludes data caching.

Commands of this run (time, command; from `{train.COMMANDS_FILE}` in the run folder):

""" + "".join(f"    {line}\n" for line in commands or ["(none recorded: the stages were run from Python)"])


# --------------------------------------------------------------------------- CLI
STAGES = (
    train.Stage("vae", "vae-", VAESettings, train_vae, "train the SD VAE"),
    train.Stage("text", "text-", TextSettings, train_text, "train the CLIP text encoder to parse captions"),
    train.Stage("unet", "unet-", UNetSettings, train_unet, "train the UNet (text-to-image)"),
    train.Stage("motion", "motion-", MotionSettings, train_motion,
                "train the motion module (UNet frozen, or its cross-attention with it)"),
)


def build_parser() -> argparse.ArgumentParser:
    return train.build_stage_parser("python -m kineflow.training.train_animatediff", __doc__.split("\n\n")[0],
                                    "runs/tiny_ad", STAGES, "write the checkpoint, motion module and model card")


def main(argv: list[str] | None = None) -> int:
    return train.run_stage_cli(build_parser(), STAGES, export, argv)


if __name__ == "__main__":
    raise SystemExit(main())
