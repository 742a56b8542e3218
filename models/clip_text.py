"""CLIP text tower (OpenAI CLIP ViT-L/14 text model), with Hugging Face `CLIPTextModel` parameter names.

HunyuanVideo feeds its pooled output (the hidden state at the end-of-text token) to the DiT as
`text_states_2`; AnimateDiff/SD1.5 use the per-token last (or a skipped) hidden state.

Internal key layout (the transformers 4.x on-disk layout, e.g. ComfyUI's `clip_l.safetensors`):
`text_model.embeddings.{token,position}_embedding.weight`, `text_model.encoder.layers.N.*`,
`text_model.final_layer_norm.*`. Files may add `text_model.embeddings.position_ids` (an index buffer),
`text_projection.weight` and `logit_scale` (only used by the contrastive head): they are accepted and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .attention import attend

# Every OpenAI/OpenCLIP text tower (B, L, H, G, bigG) uses 64-wide attention heads; shapes alone cannot
# tell the head count, so config_from_state_dict relies on this.
CLIP_HEAD_DIM = 64


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # None: pool at the position of the highest token id (HF behaviour for the original OpenAI vocabulary,
    # where <|endoftext|> = 49407 is the largest id). An int: pool at the first occurrence of that id.
    eos_token_id: int | None = None

    @classmethod
    def full(cls) -> "CLIPTextConfig":
        """CLIP ViT-L/14 text model (openai/clip-vit-large-patch14), as used by SD1.5 and HunyuanVideo."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 1000) -> "CLIPTextConfig":
        """A few-hundred-thousand-parameter model for tests (keeps the 64-wide heads of real CLIP)."""
        return cls(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=2, max_position_embeddings=77)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # [B, L, D], after final_layer_norm
    hidden_states: tuple[torch.Tensor, ...]  # embeddings + each layer's output, without final_layer_norm
    pooled_output: torch.Tensor  # [B, D], last_hidden_state at the end-of-text token


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported CLIP hidden_act {name!r}; expected 'quick_gelu' or 'gelu'")


class CLIPAttention(nn.Module):
    attention_backend = "sdpa"

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        out = attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask,
                     self.attention_backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def attention_mask_4d(attention_mask: torch.Tensor | None, batch: int, length: int,
                      device: torch.device) -> torch.Tensor:
    """Boolean [B, 1, L, L] mask for SDPA: causal, with padded keys hidden.

    A query row left with no visible key (a padded position before every real token, i.e. left padding)
    may see itself instead, which avoids NaN; rows of real tokens never change, since their own key is visible.
    """
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    mask = causal[None, None].expand(batch, 1, length, length)
    if attention_mask is not None:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
        keys_visible = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = mask & keys_visible
        blind = ~mask.any(dim=-1, keepdim=True)
        mask = mask | (blind & torch.eye(length, dtype=torch.bool, device=device))
    return mask


class CLIPTextModel(nn.Module):
    """CLIP text encoder. `forward` returns the final hidden state, every layer's hidden state and the pooled output."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        return list(self.text_model.encoder.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                num_layers: int | None = None) -> CLIPTextOutput:
        """`num_layers` stops after that many layers (clip skip without running the rest).

        With `num_layers` set, `last_hidden_state` and `pooled_output` are computed from that layer's output
        (final_layer_norm applied, as ComfyUI does for SD1.5 clip skip).
        """
        tm = self.text_model
        total = len(tm.encoder.layers)
        run = total if num_layers is None else num_layers
        if not 0 <= run <= total:
            raise ValueError(f"num_layers must be between 0 and {total}, got {num_layers}")
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {self.config.max_position_embeddings} tokens, got {n}")
        mask = attention_mask_4d(attention_mask, b, n, input_ids.device)
        x = tm.embeddings(input_ids)
        hidden_states = [x]
        for layer in tm.encoder.layers[:run]:
            x = layer(x, mask)
            hidden_states.append(x)
        last = tm.final_layer_norm(x)
        return CLIPTextOutput(last, tuple(hidden_states), last[torch.arange(b, device=last.device),
                                                               self.pool_positions(input_ids)])

    def pool_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the end-of-text token in each row (see CLIPTextConfig.eos_token_id)."""
        if self.config.eos_token_id is None:
            return input_ids.argmax(dim=-1)
        is_eos = input_ids == self.config.eos_token_id
        if not bool(is_eos.any(dim=-1).all()):
            raise ValueError(f"every row of input_ids must contain the end-of-text token {self.config.eos_token_id}")
        return is_eos.int().argmax(dim=-1)


# --------------------------------------------------------------------------- checkpoints
TOKEN_EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"
# Entries some files carry that the text tower does not use (see the module docstring).
IGNORED_KEYS = ("text_model.embeddings.position_ids", "text_projection.weight", "logit_scale")


def locate(keys: Iterable[str]) -> tuple[str, str]:
    """(prefix, layout) of the CLIP text tower in a state dict.

    layout "hf": `<prefix>text_model.embeddings...` (transformers 4.x, ComfyUI, SD1.5 `cond_stage_model.transformer.`).
    layout "hf_bare": `<prefix>embeddings...` without `text_model.` (transformers >= 5 state dicts, old SD1 files).
    """
    heads = sorted({k[: -len(TOKEN_EMBEDDING_SUFFIX)] for k in keys if k.endswith(TOKEN_EMBEDDING_SUFFIX)})
    if len(heads) > 1:
        clip_l = [h for h in heads if "clip_l" in h]
        if len(clip_l) != 1:
            raise ModelFileError(f"found several CLIP text towers ({', '.join(h or '<root>' for h in heads)}); "
                                 "expected one, or exactly one whose name contains 'clip_l'")
        heads = clip_l
    if not heads:
        raise ModelFileError(f"expected a CLIP text model (a key ending in {TOKEN_EMBEDDING_SUFFIX!r}); none found")
    head = heads[0]
    if head.endswith("text_model."):
        return head[: -len("text_model.")], "hf"
    return head, "hf_bare"


def detect_layout(keys: Iterable[str]) -> str:
    """'hf' (keys under `text_model.`) or 'hf_bare' (transformers >= 5 names without `text_model.`)."""
    return locate(keys)[1]


def convert_state_dict(sd: Mapping[str, object], layout: str | None = None) -> dict[str, object]:
    """Rename a CLIP text state dict (tensors or shapes) to the internal `text_model.*` names.

    Strips any prefix in front of the tower (`cond_stage_model.transformer.`, `clip_l.transformer.`,
    `transformer.`, ...), keeps only the tower's keys and drops `position_ids` / `text_projection` / `logit_scale`.
    """
    prefix, found = locate(sd)
    if layout is not None and layout != found:
        raise ModelFileError(f"expected a CLIP text state dict in the {layout!r} layout, found the {found!r} layout")
    start = prefix + ("text_model." if found == "hf" else "")
    out = {}
    for key, value in sd.items():
        if not key.startswith(start):
            continue
        name = "text_model." + key[len(start):]
        if name in IGNORED_KEYS or key[len(prefix):] in IGNORED_KEYS:
            continue
        out[name] = value
    return out


def _shape(value) -> tuple[int, ...]:
    if hasattr(value, "shape"):
        return tuple(value.shape)
    return tuple(value)


def config_from_state_dict(shapes: Mapping[str, object]) -> CLIPTextConfig:
    """Config from the shapes of an internal-layout state dict (values: tensors, TensorInfo or shape tuples).

    Not recoverable from shapes: the activation (quick_gelu, CLIP-L's) and the head width (64, see CLIP_HEAD_DIM).
    """
    try:
        vocab, hidden = _shape(shapes["text_model.embeddings.token_embedding.weight"])
        positions = _shape(shapes["text_model.embeddings.position_embedding.weight"])[0]
        intermediate = _shape(shapes["text_model.encoder.layers.0.mlp.fc1.weight"])[0]
    except KeyError as missing:
        raise ModelFileError(f"not a CLIP text state dict in the internal layout: {missing} is missing") from None
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
    if hidden % CLIP_HEAD_DIM:
        raise ModelFileError(f"CLIP hidden size {hidden} is not a multiple of the {CLIP_HEAD_DIM}-wide heads")
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=hidden // CLIP_HEAD_DIM,
                          max_position_embeddings=positions)
