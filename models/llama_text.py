"""LLaMA decoder used as a text encoder (HunyuanVideo's LLaVA-LLaMA-3-8B language model), Hugging Face names.

HunyuanVideo reads a hidden state a few layers before the end (`hidden_state_skip_layer`), so `forward`
takes the index of the wanted hidden state and stops running layers there.

Internal key layout (transformers `LlamaModel` under `model.`): `model.embed_tokens.weight`,
`model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
`model.layers.N.{input,post_attention}_layernorm.weight`, `model.norm.weight`. Files saved from a
`LlamaForCausalLM` also hold `lm_head.weight`; an encoder never uses it, so it is dropped.

GGUF text encoders use llama.cpp's names (`token_embd`, `blk.N.attn_q`, `blk.N.ffn_gate`, `output_norm`, ...),
renamed here. llama.cpp's converter also permutes the rows of q and k within each head so that rotary pairs are
adjacent (its "normal" RoPE) instead of half a head apart (transformers' rotate_half). The rows stay as stored
(still quantized) and the model rotates adjacent pairs instead (`rope_interleaved`): q and k get the same
permutation, so the attention scores, and everything after them, are those of the original model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError
from .attention import attend
from .clip_text import attention_mask_4d

# LLaMA-family checkpoints use 128-wide heads; shapes alone cannot tell the head count, so
# config_from_state_dict relies on this (the tiny test config keeps it too).
LLAMA_HEAD_DIM = 128


@dataclass(frozen=True)
class LlamaTextConfig:
    vocab_size: int = 128320
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    rope_interleaved: bool = False  # rotary pairs adjacent (llama.cpp's row order), not half a head apart

    @classmethod
    def full(cls) -> "LlamaTextConfig":
        """LLaVA-LLaMA-3-8B language model (HunyuanVideo's text encoder; vocab 128320 as ComfyUI builds it)."""
        return cls()

    @classmethod
    def tiny(cls, vocab_size: int = 1000) -> "LlamaTextConfig":
        """A ~1.5M-parameter model for tests: 4 layers, 2 query heads sharing 1 KV head (GQA), 128-wide heads."""
        return cls(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=2, num_key_value_heads=1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 then cast back before the gain, as the reference implementation does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(length: int, head_dim: int, theta: float, device: torch.device,
                 interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, head_dim] for rotary embeddings: pairs (i, i + head_dim/2) (rotate_half), or
    (2i, 2i+1) when `interleaved`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    angles = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    if interleaved:
        rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class LlamaAttention(nn.Module):
    attention_backend = "sdpa"

    def __init__(self, cfg: LlamaTextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rope_interleaved = cfg.rope_interleaved
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin, self.rope_interleaved), apply_rope(k, cos, sin, self.rope_interleaved)
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # grouped-query attention: each KV head serves `group` query heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = attend(q, k, v, mask, self.attention_backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaTextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaTextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: LlamaTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaTextEncoder(nn.Module):
    def __init__(self, config: LlamaTextConfig):
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({config.num_key_value_heads})")
        self.config = config
        self.model = LlamaBody(config)

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        return list(self.model.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_layer: int = -1, image_embeds: torch.Tensor | None = None,
                image_start: int = 0) -> torch.Tensor:
        """The hidden state at `output_hidden_layer`, indexed like transformers' `hidden_states` tuple.

        Index 0 is the embeddings, index i the output of layer i (no final norm), and index -1 (= num_layers)
        the last layer's output after `model.norm`. HunyuanVideo's `hidden_state_skip_layer=k` is index -(k+1).
        Layers after the requested one are not run.

        `image_embeds` [B, N, D] (LLaVA's image tokens, models/clip_vision.py) take the place of the token embeddings
        at positions image_start .. image_start + N, as LLaVA merges an image into its prompt.
        """
        n_layers = self.config.num_hidden_layers
        index = output_hidden_layer if output_hidden_layer >= 0 else n_layers + 1 + output_hidden_layer
        if not 0 <= index <= n_layers:
            raise ValueError(f"output_hidden_layer must be in [{-(n_layers + 1)}, {n_layers}], got {output_hidden_layer}")
        b, n = input_ids.shape
        body = self.model
        x = body.embed_tokens(input_ids)
        if image_embeds is not None:
            end = image_start + image_embeds.shape[1]
            if image_embeds.shape[0] != b or image_embeds.shape[2] != x.shape[2] or not 0 <= image_start <= end <= n:
                raise ValueError(f"image_embeds {tuple(image_embeds.shape)} at position {image_start} do not fit the "
                                 f"embedded tokens {tuple(x.shape)}")
            x = torch.cat([x[:, :image_start], image_embeds.to(x), x[:, end:]], dim=1)
        mask = attention_mask_4d(attention_mask, b, n, x.device)
        cos, sin = rope_cos_sin(n, self.config.head_dim, self.config.rope_theta, x.device,
                                self.config.rope_interleaved)
        for layer in body.layers[:index]:
            x = layer(x, cos, sin, mask)
        return body.norm(x) if index == n_layers else x


# --------------------------------------------------------------------------- checkpoints
EMBED_SUFFIX = "embed_tokens.weight"


# llama.cpp's names (GGUF files) -> the Hugging Face names: whole keys, then the parts of `blk.N.<part>`.
_GGUF_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_name(key: str) -> str | None:
    """The Hugging Face name (under `model.`) of a llama.cpp tensor name; None for tensors an encoder never uses."""
    if key in _GGUF_NAMES:
        return "model." + _GGUF_NAMES[key]
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return None


def locate(keys: Iterable[str]) -> tuple[str, str]:
    """(prefix, layout): layout "hf" has `<prefix>model.embed_tokens...`, "hf_bare" has `<prefix>embed_tokens...`,
    "gguf" llama.cpp's `token_embd.weight`, `blk.N...` (no prefix)."""
    keys = list(keys)
    if any(k == "token_embd.weight" or k.startswith("blk.") for k in keys):
        return "", "gguf"
    heads = sorted({k[: -len(EMBED_SUFFIX)] for k in keys if k.endswith(EMBED_SUFFIX)})
    if len(heads) != 1:
        raise ModelFileError(f"expected one LLaMA model (one key ending in {EMBED_SUFFIX!r}); found {len(heads)}"
                             + (f": {', '.join(h or '<root>' for h in heads)}" if heads else ""))
    head = heads[0]
    if head.endswith("model."):
        return head[: -len("model.")], "hf"
    return head, "hf_bare"


def detect_layout(keys: Iterable[str]) -> str:
    """'hf' (`model.layers...`, transformers and ComfyUI files), 'hf_bare' (the same names without `model.`) or
    'gguf' (llama.cpp's names)."""
    return locate(keys)[1]


def convert_state_dict(sd: Mapping[str, object], layout: str | None = None) -> dict[str, object]:
    """Rename a LLaMA state dict (tensors or shapes) to the internal `model.*` names; drops `lm_head.weight`
    and anything outside the model (e.g. other encoders sharing the file)."""
    prefix, found = locate(sd)
    if layout is not None and layout != found:
        raise ModelFileError(f"expected a LLaMA state dict in the {layout!r} layout, found the {found!r} layout")
    if found == "gguf":
        return {name: value for key, value in sd.items() if (name := _gguf_name(key)) is not None}
    start = prefix + ("model." if found == "hf" else "")
    out = {}
    for key, value in sd.items():
        if key.startswith(start) and key != prefix + "lm_head.weight":
            out["model." + key[len(start):]] = value
    return out


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def config_from_state_dict(shapes: Mapping[str, object], head_dim: int = LLAMA_HEAD_DIM) -> LlamaTextConfig:
    """Config from the shapes of an internal-layout state dict (values: tensors, TensorInfo or shape tuples).

    Not recoverable from shapes: rope_theta and rms_norm_eps (LLaMA-3 values are used) and the head width
    (`head_dim`, default 128 = LLAMA_HEAD_DIM; a Hugging Face folder's config.json tells the real one).
    """
    try:
        vocab, hidden = _shape(shapes["model.embed_tokens.weight"])
        q_out = _shape(shapes["model.layers.0.self_attn.q_proj.weight"])[0]
        kv_out = _shape(shapes["model.layers.0.self_attn.k_proj.weight"])[0]
        intermediate = _shape(shapes["model.layers.0.mlp.gate_proj.weight"])[0]
    except KeyError as missing:
        raise ModelFileError(f"not a LLaMA state dict in the internal layout: {missing} is missing") from None
    if q_out % head_dim or kv_out % head_dim or q_out != hidden:
        raise ModelFileError(f"unsupported LLaMA attention shapes: q_proj out {q_out}, k_proj out {kv_out}, hidden "
                             f"{hidden}; expected q_proj out == hidden and both multiples of the head width {head_dim}")
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("model.layers."))
    return LlamaTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=q_out // head_dim,
                           num_key_value_heads=kv_out // head_dim)
