"""LLaVA's image encoder: the CLIP vision transformer and the multimodal projector, as HunyuanVideo-I2V reads an image.

HunyuanVideo-I2V's text encoder is LLaVA-LLaMA-3-8B (xtuner/llava-llama-3-8b-v1_1-transformers): the first frame goes
through CLIP ViT-L/14 at 336 px, the hidden state of its second-to-last layer (`vision_feature_layer = -2`, the
output of layer 23 of 24, no post-layernorm) loses its class token (`vision_feature_select_strategy = "default"`), and
LLaVA's projector (linear, exact GELU, linear) maps the 576 patch tokens (24 x 24) to the LLaMA width, 4096. Those
576 vectors take the place of the prompt's `<image>` token (models/hunyuan_text.py).

The vision transformer is CLIP's pre-layernorm ViT: patch embedding (a stride-14 convolution, no bias), a learned
class token in front, learned position embeddings, `pre_layrnorm` (so spelled in the released files), then the same
encoder layers as CLIP's text tower (models/clip_text.py: layer_norm1, self-attention, layer_norm2, quick-GELU MLP),
without a causal mask. `post_layernorm` only pools the class token (CLIPVisionModel's pooler output); LLaVA does not
use it, but the files carry it.

Internal key layout (transformers 4.x on-disk names, ComfyUI's `llava_llama3_vision.safetensors`):
`vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}`,
`vision_model.pre_layrnorm.*`, `vision_model.encoder.layers.N.*`, `vision_model.post_layernorm.*`,
`multi_modal_projector.linear_{1,2}.{weight,bias}`. Files also seen:
- transformers' LlavaForConditionalGeneration (4.x): `vision_tower.vision_model.*`, `multi_modal_projector.*`, beside
  `language_model.*` (which Load Text Encoders reads);
- transformers >= 4.52 / 5 saves: `model.vision_tower.*` (no `vision_model.` level), `model.multi_modal_projector.*`.
`position_ids` buffers and a CLIP `visual_projection.weight` (the contrastive head, unused by LLaVA) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .clip_text import CLIP_HEAD_DIM, CLIPEncoderLayer

# OpenAI CLIP's pixel normalisation (CLIPImageProcessor's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), which LLaVA keeps.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projector_width: int = 4096  # LLaVA's projector output: the LLaMA hidden size
    feature_layer: int = -2  # the hidden state LLaVA reads (transformers' hidden_states index)

    @classmethod
    def full(cls) -> "CLIPVisionConfig":
        """CLIP ViT-L/14 at 336 px with LLaVA-LLaMA-3-8B's projector (HunyuanVideo-I2V's image encoder)."""
        return cls()

    @classmethod
    def tiny(cls, projector_width: int = 256) -> "CLIPVisionConfig":
        """A test model: 3 layers of 64-wide heads over 2 x 2 patches of 14 px (28 px images)."""
        return cls(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                   projector_width=projector_width)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_tokens(self) -> int:
        """Tokens an image becomes in the prompt: the patches (the class token is dropped)."""
        return self.num_patches


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.class_embedding  # this module's own weight (the patch convolution's is read by calling it)
        patches = self.patch_embedding(pixel_values.to(cls.dtype))  # [B, D, h, w]
        patches = patches.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the patch grid
        cls = cls.expand(patches.shape[0], 1, -1)
        positions = torch.arange(patches.shape[1] + 1, device=patches.device)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(positions)[None]


class CLIPVisionEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPVisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class LlavaProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: vision width -> LLaMA width, exact (erf) GELU, LLaMA width -> LLaMA width."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.projector_width)
        self.linear_2 = nn.Linear(cfg.projector_width, cfg.projector_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class LlavaVisionEncoder(nn.Module):
    """CLIP vision tower + LLaVA projector. `forward(pixel_values)` gives the image tokens [B, patches, projector_width]."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.multi_modal_projector = LlavaProjector(config)

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        return list(self.vision_model.encoder.layers)

    def hidden_state(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The vision transformer's hidden state `layer` [B, 1 + patches, D], indexed like transformers'
        `hidden_states`: 0 is the embeddings after `pre_layrnorm`, i the output of layer i, -1 the last layer's (no
        post-layernorm). Layers after it are not run."""
        n_layers = self.config.num_hidden_layers
        index = layer if layer >= 0 else n_layers + 1 + layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"layer must be in [{-(n_layers + 1)}, {n_layers}], got {layer}")
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.num_channels, size, size):
            raise ValueError(f"expected pixel values [B, {self.config.num_channels}, {size}, {size}], got "
                             f"{tuple(pixel_values.shape)}")
        tower = self.vision_model
        x = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for block in tower.encoder.layers[:index]:
            x = block(x, None)
        return x

    def pooled(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """CLIPVisionModel's pooler output: the class token of the last hidden state after `post_layernorm`."""
        return self.vision_model.post_layernorm(last_hidden_state[:, 0])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tokens for the LLaMA prompt: hidden state `feature_layer` without its class token, projected."""
        features = self.hidden_state(pixel_values, self.config.feature_layer)[:, 1:]
        return self.multi_modal_projector(features)


def preprocess(images: torch.Tensor, size: int, mean=CLIP_IMAGE_MEAN, std=CLIP_IMAGE_STD) -> torch.Tensor:
    """IMAGE frames [F, H, W, 3] in 0..1 -> CLIP pixel values [F, 3, size, size], as CLIPImageProcessor prepares them
    for LLaVA: the shorter side resized to `size` (bicubic, antialiased), the centre `size` x `size` cropped, then
    normalised with CLIP's mean and std. Stays on the images' device."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"expected IMAGE frames [F, H, W, 3]; got shape {tuple(images.shape)}")
    x = images[..., :3].permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# --------------------------------------------------------------------------- checkpoints
PATCH_SUFFIX = "embeddings.patch_embedding.weight"
PROJECTOR_SUFFIX = "multi_modal_projector.linear_1.weight"
# Entries of the tower's files the encoder does not use (see the module docstring), after the tower's prefix.
_IGNORED = ("embeddings.position_ids",)
_IGNORED_FILE_KEYS = ("visual_projection.weight",)


def locate(keys: Iterable[str]) -> tuple[str, str, str]:
    """(tower prefix, layout, projector prefix) of a LLaVA vision encoder in a state dict.

    layout "hf": the tower under `<prefix>vision_model.` (ComfyUI, transformers 4.x); "hf_bare": the tower's names right
    after the prefix (transformers >= 4.52 `model.vision_tower.`). The projector prefix ends in
    `multi_modal_projector.`; "" when the file has none (a plain CLIP vision model)."""
    keys = list(keys)
    towers = sorted({k[: -len(PATCH_SUFFIX)] for k in keys if k.endswith(PATCH_SUFFIX)})
    if len(towers) != 1:
        raise ModelFileError(f"expected one CLIP vision tower (one key ending in {PATCH_SUFFIX!r}); found {len(towers)}"
                             + (f": {', '.join(t or '<root>' for t in towers)}" if towers else ""))
    projectors = sorted({k[: -len("linear_1.weight")] for k in keys if k.endswith(PROJECTOR_SUFFIX)})
    if len(projectors) > 1:
        raise ModelFileError(f"expected one LLaVA projector; found {len(projectors)}: {', '.join(projectors)}")
    tower = towers[0]
    projector = projectors[0] if projectors else ""
    if tower.endswith("vision_model."):
        return tower[: -len("vision_model.")], "hf", projector
    return tower, "hf_bare", projector


def detect_layout(keys: Iterable[str]) -> str:
    return locate(keys)[1]


def convert_state_dict(sd: Mapping[str, object], layout: str | None = None) -> dict[str, object]:
    """Rename a LLaVA vision encoder's state dict (tensors or shapes) to the internal names; keeps only the tower and
    the projector (not a LLaVA file's language model) and drops position_ids / visual_projection."""
    prefix, found, projector = locate(sd)
    if layout is not None and layout != found:
        raise ModelFileError(f"expected a CLIP vision state dict in the {layout!r} layout, found the {found!r} layout")
    if not projector:
        raise ModelFileError(
            "this CLIP vision model has no LLaVA projector (no key ending in 'multi_modal_projector.linear_1.weight'): it "
            "is a plain CLIP image encoder (e.g. for IP-Adapter or Wan), not LLaVA's. HunyuanVideo-I2V needs "
            "llava_llama3_vision.safetensors (ComfyUI's clip_vision file) or the LLaVA text encoder folder")
    start = prefix + ("vision_model." if found == "hf" else "")
    out = {}
    for key, value in sd.items():
        if key.startswith(projector) and key[len(projector):].startswith("linear_"):
            out["multi_modal_projector." + key[len(projector):]] = value
        elif key.startswith(start) and key not in _IGNORED_FILE_KEYS:
            name = key[len(start):]
            if name not in _IGNORED and not name.startswith("multi_modal_projector."):
                out["vision_model." + name] = value
    return out


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def config_from_state_dict(shapes: Mapping[str, object]) -> CLIPVisionConfig:
    """Config from the shapes of an internal-layout state dict (values: tensors, TensorInfo or shape tuples).

    Not recoverable from shapes: the activation (quick_gelu, CLIP's), the head width (64, as in every OpenAI CLIP) and
    the layer LLaVA reads (-2)."""
    try:
        hidden, channels, patch, _ = _shape(shapes["vision_model.embeddings.patch_embedding.weight"])
        positions = _shape(shapes["vision_model.embeddings.position_embedding.weight"])[0]
        intermediate = _shape(shapes["vision_model.encoder.layers.0.mlp.fc1.weight"])[0]
        projector_width = _shape(shapes["multi_modal_projector.linear_1.weight"])[0]
    except KeyError as missing:
        raise ModelFileError(f"not a LLaVA vision encoder in the internal layout: {missing} is missing") from None
    except ValueError:
        raise ModelFileError("the CLIP vision patch embedding is not a [D, C, P, P] convolution weight") from None
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise ModelFileError(f"the CLIP vision position embedding has {positions} rows; expected a square grid of "
                             "patches plus the class token (577 = 24 x 24 + 1 at 336 px)")
    if hidden % CLIP_HEAD_DIM:
        raise ModelFileError(f"CLIP vision hidden size {hidden} is not a multiple of the {CLIP_HEAD_DIM}-wide heads")
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("vision_model.encoder.layers."))
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=hidden // CLIP_HEAD_DIM, image_size=side * patch, patch_size=patch,
                            num_channels=channels, projector_width=projector_width)
