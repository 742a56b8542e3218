"""The `i2v` stage: an image-to-video transformer fine-tuned from an exported tiny text-to-video one.

    python -m kineflow.training.train i2v --run-dir runs/tiny_i2v --threads 1 [--base weights] [--resume]

(the defaults are the shipped model's run: weights/MODEL_CARD_IMAGE_TO_VIDEO.md)

The result has HunyuanVideo-I2V's first-release layout ("latent_concat", 33 input channels for 16 latent channels):
the input projection `img_in` takes the noisy latent, then the image latent (the clip's first latent frame in frame
0, zeros after) and a mask channel (1 in frame 0), exactly what Image To Video gives the model at sampling time
(models/hunyuan_video_dit.py `image_condition_channels`). The new input channels start at zero, so step 0 computes
exactly what the text-to-video base computed; every weight then trains on the base's flow-matching loss
(train.py `dit_loss`) over clips of the shapes dataset, whose first frames come from the clips themselves (the
causal VAE codes frame 0 alone in latent frame 0, so that latent is what encoding the image alone gives).

Latents and text conditioning come from the base's own VAE and text encoders (`fine_tune.encode_clips`, cached in
`RUN/i2v/cache.pt`). Resumable like the other stages; at the end the transformer is written in the export dtype to
`RUN/i2v/kineflow_tiny_i2v_dit.safetensors`, with the base's metadata (preview factors, training record) and its
own record under `kineflow.i2v`. Copy it into `diffusion_models/` beside the base's VAE and text encoders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..models import hunyuan_video_dit as dit_mod
from ..shapes import dataset as shapes
from .common import Budget, file_digest, step_rngs
from .fine_tune import encode_clips, load_base_state, models_folder
from .tiny_models import save_safetensors
from .train import DTYPES, I2VSettings, StageResult, base_file, dit_loss, run_loop, trainable_dit

STAGE = "i2v"
I2V_FILE = "kineflow_tiny_i2v_dit.safetensors"
# Base metadata the image-to-video file keeps: what describes the VAE's latents and the base's training. The step
# cache's fitted coefficients describe the base's blocks, not the fine-tuned ones, so they are left out (the Step
# Cache then uses the published HunyuanVideo polynomial).
KEPT_METADATA = ("kineflow.latent_rgb_factors", "kineflow.training")


def image_to_video_state(base: dict[str, torch.Tensor]) -> tuple[dit_mod.HunyuanVideoDiTConfig, dict]:
    """The config and weights of a latent_concat (image + mask channels) transformer that computes exactly what the
    text-to-video `base` computes: `img_in`'s weights for the new input channels are zero."""
    config = dit_mod.config_from_state_dict(base)
    if config.image_condition is not None:
        raise ValueError(f"the base transformer is already an image-to-video model ({config.variant})")
    channels = config.out_channels
    config = dataclasses.replace(config, in_channels=2 * channels + 1, image_condition="latent_concat")
    state = dict(base)
    weight = base["img_in.proj.weight"]  # [hidden, C, pt, ph, pw]
    grown = weight.new_zeros(weight.shape[0], config.in_channels, *weight.shape[2:])
    grown[:, :channels] = weight
    state["img_in.proj.weight"] = grown
    return config, state


def train_i2v(run_dir: Path, settings: I2VSettings, *, resume: bool = False,
              budget: Budget | None = None) -> StageResult:
    run_dir = Path(run_dir)
    models_dir = models_folder(settings.base)
    base_dit = base_file(models_dir, "dit")
    key = {"clips": settings.clips, "two_shape_prob": settings.two_shape_prob, "size": settings.size,
           "seed": settings.seed}
    data = shapes.ShapesVideoDataset(length=settings.clips, seed=settings.seed, split="train",
                                     two_shape_prob=settings.two_shape_prob, height=settings.size, width=settings.size)
    cache = encode_clips(run_dir / STAGE / "cache.pt", key, [data], models_dir, "i2v cache")
    config, state = image_to_video_state(load_base_state(base_dit))
    net = trainable_dit(config)
    net.load_state_dict(state)  # a resumed run then loads its checkpoint over these
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=0.0)
    n = len(cache["latents"])

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = step_rngs(settings.seed, STAGE, step)
        return dit_loss(net, cache, rng.integers(0, n, settings.batch_size), gen, settings)

    result = run_loop(STAGE, run_dir, net, optimizer, loss_fn, settings, resume=resume, budget=budget or Budget())
    if result.finished:
        path = export_i2v(net, run_dir / STAGE / I2V_FILE, settings, base_dit=base_dit, steps=result.step,
                          train_seconds=result.train_seconds)
        print(f"i2v: {path} ({path.stat().st_size / 1e6:.2f} MB, {config.variant}); copy it into your models "
              "folder's diffusion_models/")
    return result


def export_i2v(net: dit_mod.HunyuanVideoDiT, path: Path, settings: I2VSettings, *, base_dit: Path, steps: int,
               train_seconds: float) -> Path:
    from safetensors import safe_open

    with safe_open(str(base_dit), "pt") as f:
        base_meta = f.metadata() or {}
    record = {"base_model": base_dit.name, "base_model_sha256": file_digest(base_dit), "variant": net.config.variant,
              "steps": steps, "train_seconds": round(train_seconds, 1), "settings": dataclasses.asdict(settings)}
    metadata = {**{k: v for k, v in base_meta.items() if k in KEPT_METADATA}, "kineflow.i2v": json.dumps(record)}
    dtype = DTYPES[settings.dtype]
    return save_safetensors({k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}, path,
                            metadata)
