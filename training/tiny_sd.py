"""Tiny random-weight AnimateDiff-family files (SD1.5 checkpoint, motion modules, motion LoRA, v3 adapter)
written in the real file layouts, for tests and for trying the AnimateDiff workflow wiring.

What each file looks like (same key names as the released files, much smaller widths):
- `checkpoints/kineflow_random_sd15.safetensors`: one LDM file, `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (KL-f8 VAE: 4 levels, so latents are 1/8 of the size as in SD1.5) and
  `cond_stage_model.transformer.text_model.*` (CLIP text tower with the full 49408-token vocabulary, so the
  shipped CLIP-L tokenizer works, but 64 wide).
- the same three parts as separate files in `diffusion_models/`, `vae/` and `text_encoders/`.
- `animatediff_models/kineflow_random_mm_{v1,v2,v3}.safetensors`: original AnimateDiff names
  (`down_blocks.N.motion_modules.M.temporal_transformer.*`, every attention's `pos_encoder.pe`), positional
  tables of 24 (v1) or 32 (v2, v3) frames, a mid-block module for v2 only.
- `animatediff_motion_lora/kineflow_random_motion_lora.safetensors`: the released motion-LoRA names
  (`...attention_blocks.K.processor.to_q_lora.down.weight`), covering the v2 module (mid block included).
- `loras/kineflow_random_v3_adapter.safetensors`: the v3 domain adapter format (diffusers UNet names with
  processor LoRAs on the spatial attention layers).

Zero-initialised output layers (the motion modules' proj_out) are filled with small random values, so the
temporal path of a random module changes the output as a trained one does. The names are never the shipped
models' (see training/tiny_models.py).

    python -m kineflow.training.tiny_models --family animatediff [--out kineflow_models/]
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..models.animatediff import MotionModule, MotionModuleConfig
from ..models.clip_text import CLIPTextConfig, CLIPTextModel
from ..models.sd15_unet import LDM_PREFIX as UNET_PREFIX
from ..models.sd15_unet import SD15UNet, SD15UNetConfig
from ..models.sd_vae import LDM_PREFIX as VAE_PREFIX
from ..models.sd_vae import SDVAE, SDVAEConfig
from .tiny_models import CLIP_VOCAB, save_safetensors

CLIP_PREFIX = "cond_stage_model.transformer."

# Widths are multiples of 32 (the GroupNorm group count, which shapes do not reveal) and heads are 8 (the
# count the loaders assume for SD1.5 and AnimateDiff), so the files load exactly like released ones.
TINY_CLIP = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=1, max_position_embeddings=77)
TINY_UNET = SD15UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                           num_heads=8, context_dim=TINY_CLIP.hidden_size)
TINY_VAE = SDVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)

NAMES = {
    "checkpoint": "checkpoints/kineflow_random_sd15.safetensors",
    "unet": "diffusion_models/kineflow_random_sd15_unet.safetensors",
    "vae": "vae/kineflow_random_sd_vae.safetensors",
    "clip": "text_encoders/kineflow_random_sd_clip.safetensors",
    "mm_v1": "animatediff_models/kineflow_random_mm_v1.safetensors",
    "mm_v2": "animatediff_models/kineflow_random_mm_v2.safetensors",
    "mm_v3": "animatediff_models/kineflow_random_mm_v3.safetensors",
    "motion_lora": "animatediff_motion_lora/kineflow_random_motion_lora.safetensors",
    "adapter": "loras/kineflow_random_v3_adapter.safetensors",
}


def tiny_motion_config(version: str, block_channels: tuple[int, ...] | None = None) -> MotionModuleConfig:
    """The motion module for TINY_UNET (or for other UNet widths, to build modules that do not fit)."""
    channels = block_channels or tuple(TINY_UNET.level_channels())
    return replace(MotionModuleConfig.full(version), block_channels=channels,
                   layers_per_block=TINY_UNET.num_res_blocks, heads=8)


def _fill_zeros(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


def _seeded(cls, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _fill_zeros(cls(config), torch.Generator().manual_seed(seed + 1)).eval()


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def write_sd_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """One LDM file holding UNet, VAE and CLIP under their SD1.5 prefixes."""
    unet, vae, clip = _seeded(SD15UNet, TINY_UNET, seed), _seeded(SDVAE, TINY_VAE, seed + 10), _seeded(CLIPTextModel, TINY_CLIP, seed + 20)
    sd = {**_prefixed(UNET_PREFIX, unet.state_dict()), **_prefixed(VAE_PREFIX, vae.state_dict()),
          **_prefixed(CLIP_PREFIX, clip.state_dict())}
    return save_safetensors(sd, Path(path))


def write_sd_components(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """The same three parts (same weights as `write_sd_checkpoint(seed)`) as separate files, LDM/HF names."""
    models_dir = Path(models_dir)
    parts = {"unet": _seeded(SD15UNet, TINY_UNET, seed), "vae": _seeded(SDVAE, TINY_VAE, seed + 10),
             "clip": _seeded(CLIPTextModel, TINY_CLIP, seed + 20)}
    return {name: save_safetensors(model.state_dict(), models_dir / NAMES[name]) for name, model in parts.items()}


def write_motion_module(path: str | Path, version: str, seed: int = 0,
                        block_channels: tuple[int, ...] | None = None) -> Path:
    module = _seeded(MotionModule, tiny_motion_config(version, block_channels), seed)
    return save_safetensors(module.state_dict(), Path(path))


def _lora_for(layers: dict[str, nn.Linear], rank: int, generator: torch.Generator, scale: float = 0.1) -> dict:
    """Processor-style LoRA tensors for `{module path: linear}` (`to_out.0` is spelled `to_out_lora`)."""
    out = {}
    for name, layer in layers.items():
        base, proj = (name[: -len(".to_out.0")], "to_out") if name.endswith(".to_out.0") else name.rsplit(".", 1)
        out_features, in_features = layer.weight.shape
        out[f"{base}.processor.{proj}_lora.down.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        out[f"{base}.processor.{proj}_lora.up.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    return out


_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_motion_lora(path: str | Path, seed: int = 0, rank: int = 2) -> Path:
    """A motion LoRA for every temporal attention projection of the tiny v2 module (mid block included)."""
    with torch.device("meta"):
        module = MotionModule(tiny_motion_config("v2"))
    layers = {n: m for n, m in module.named_modules() if ".attention_blocks." in n and n.endswith(_PROJECTIONS)}
    return save_safetensors(_lora_for(layers, rank, torch.Generator().manual_seed(seed)), Path(path))


def diffusers_attention_layers(config: SD15UNetConfig) -> list[str]:
    """diffusers `UNet2DConditionModel` paths of every spatial attention projection of an SD1.5-style UNet."""
    levels = len(config.channel_mult)
    blocks = []
    for level in range(levels):
        if config.attention_levels[level]:
            blocks += [f"down_blocks.{level}.attentions.{j}" for j in range(config.num_res_blocks)]
            up = levels - 1 - level  # diffusers numbers up blocks from the deepest level
            blocks += [f"up_blocks.{up}.attentions.{j}" for j in range(config.num_res_blocks + 1)]
    blocks.append("mid_block.attentions.0")
    return [f"{b}.transformer_blocks.0.{attn}.{proj}" for b in blocks for attn in ("attn1", "attn2") for proj in _PROJECTIONS]


def write_domain_adapter(path: str | Path, seed: int = 0, rank: int = 2) -> Path:
    """The v3 domain adapter format for TINY_UNET: processor LoRAs under diffusers UNet names."""
    from ..models.sd15_unet import diffusers_module_to_ldm

    with torch.device("meta"):
        unet = SD15UNet(TINY_UNET)
    levels = len(TINY_UNET.channel_mult)
    up_attention = {i for i in range(levels) if TINY_UNET.attention_levels[levels - 1 - i]}
    layers = {name: unet.get_submodule(diffusers_module_to_ldm(name, levels, TINY_UNET.num_res_blocks, up_attention))
              for name in diffusers_attention_layers(TINY_UNET)}
    return save_safetensors(_lora_for(layers, rank, torch.Generator().manual_seed(seed)), Path(path))


def write_models(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Every tiny AnimateDiff-family file under `models_dir` (ComfyUI folder names). Returns {key: path}."""
    models_dir = Path(models_dir)
    paths = {"checkpoint": write_sd_checkpoint(models_dir / NAMES["checkpoint"], seed)}
    paths.update(write_sd_components(models_dir, seed))
    for i, version in enumerate(("v1", "v2", "v3")):
        paths[f"mm_{version}"] = write_motion_module(models_dir / NAMES[f"mm_{version}"], version, seed + 30 + i)
    paths["motion_lora"] = write_motion_lora(models_dir / NAMES["motion_lora"], seed + 40)
    paths["adapter"] = write_domain_adapter(models_dir / NAMES["adapter"], seed + 50)
    return paths

