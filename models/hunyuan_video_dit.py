"""HunyuanVideo diffusion transformer (MM-DiT), read top to bottom.

The network predicts the flow-matching velocity of a video latent `[B, C, T, H, W]` from
- a timestep on the 0..1000 scale (as the original code),
- LLaMA text states `[B, L, 4096]` with their attention mask `[B, L]` (1 = real token, right padding),
- the CLIP-L pooled text vector `[B, 768]`,
- for the guidance-distilled release, the embedded guidance strength x 1000 (as the original: 6.0 -> 6000.0).

Layout: the text tokens go through a small "individual token refiner"; then `mm_double_blocks_depth`
double-stream blocks (separate weights for video and text, one joint attention over both) and
`mm_single_blocks_depth` single-stream blocks (one fused linear for qkv + MLP-in, one for proj + MLP-out) run
over the concatenated [video; text] sequence. Video tokens get a 3D rotary embedding over (t, h, w) with
per-axis head-dim slices `rope_dim_list`; text tokens get none. Every block is modulated (adaLN) by one vector
`vec = time_in(t) + vector_in(clip_pooled) + guidance_in(guidance)`.

Parameter names are the original Tencent ones (`double_blocks.N.img_attn_qkv.weight`, ...), so the original
file loads as is; ComfyUI and diffusers layouts are converted by `convert_state_dict`.

Text padding: padded text tokens are masked out as attention keys. Trailing columns that are padding for every
batch item are dropped before the transformer, which is exact (they can only influence padded positions) and
makes the common batch-of-one case run without any attention mask. Right-padded text (what the text encoders give)
is passed to attention as `KeyPadding`, which the packed-sequence kernels run without a mask (models/attention.py).

Step caching (models/caching.py, TeaCache): the probe is the first double block's modulated video input; on a step
the cache skips, the text refiner and every block are skipped and the video tokens get the cached residual.

Image to video (`image_condition`), as the released I2V variants condition on a first frame:
- "latent_concat": the input projection takes more channels than the model predicts. HunyuanVideo-I2V's first
  release (33 = 16 noisy + 16 image latent + 1 mask) and SkyReels-V1-Hunyuan-I2V (32 = 16 noisy + 16 image latent);
  the image latent sits in latent frame 0 and zeros elsewhere, the mask is 1 in frame 0 and 0 elsewhere
  (`image_condition_channels`). Detected from the shape of `img_in.proj.weight`.
- "token_replace": HunyuanVideo-I2V's later release (16 input channels, the same weights' names and shapes as the
  text-to-video model, so not detectable from the file): latent frame 0 holds the clean image latent, and its video
  tokens are modulated by the conditioning vector of timestep 0 (time_in(0) + vector_in(clip), no guidance term)
  in every double and single block, while the other tokens, the text and the final layer keep the step's vector.
  `forward(..., token_replace=True)` runs it on any 16-channel model; the sampler keeps frame 0 clean.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KineFlowError, ModelFileError
from .attention import KeyPadding, attend, right_padded_lengths
from .caching import StepCacheHook
from .sequence_parallel import ParallelGroups, ShardedAttention

# --------------------------------------------------------------------------- config


def default_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Per-axis (t, h, w) rotary dims as HunyuanVideo splits a head: 1/8 for time, the rest halved (128 -> 16,56,56).

    Checkpoints do not store this split, so configs derived from weights use this rule; every dim is even."""
    spatial = (head_dim - 2 * round(head_dim / 16)) // 2 // 2 * 2
    return (head_dim - 2 * spatial, spatial, spatial)


@dataclass
class HunyuanVideoDiTConfig:
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 3072
    heads_num: int = 24
    mlp_width_ratio: float = 4.0
    mm_double_blocks_depth: int = 20
    mm_single_blocks_depth: int = 40
    refiner_depth: int = 2
    rope_dim_list: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 256.0
    text_states_dim: int = 4096
    text_states_dim_2: int = 768
    guidance_embed: bool = True
    qkv_bias: bool = True
    image_condition: str | None = None  # None (text to video), "latent_concat" or "token_replace"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.rope_dim_list = tuple(int(d) for d in self.rope_dim_list)
        if self.hidden_size % self.heads_num:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads_num {self.heads_num}")
        if sum(self.rope_dim_list) != self.head_dim or any(d % 2 for d in self.rope_dim_list):
            raise ValueError(
                f"rope_dim_list {self.rope_dim_list} must be even dims summing to the head dim {self.head_dim}"
            )
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")
        concat = (2 * self.out_channels, 2 * self.out_channels + 1)
        expected = {None: (self.out_channels,), "latent_concat": concat, "token_replace": (self.out_channels,)}
        if self.image_condition not in expected:
            raise ValueError(f"image_condition {self.image_condition!r} is not one of {list(expected)}")
        if self.in_channels not in expected[self.image_condition]:
            raise ValueError(f"image_condition {self.image_condition!r} needs in_channels in "
                             f"{expected[self.image_condition]} (out_channels {self.out_channels}); got {self.in_channels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads_num

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_width_ratio)

    @property
    def image_mask_channel(self) -> bool:
        """latent_concat with a mask channel after the image latent (HunyuanVideo-I2V 33ch; SkyReels-V1 has none)."""
        return self.in_channels == 2 * self.out_channels + 1

    @property
    def variant(self) -> str:
        """Which release the shapes say this is: t2v, i2v-33ch (HunyuanVideo-I2V latent concat + mask), i2v-32ch
        (SkyReels-V1-Hunyuan-I2V) or i2v-token-replace."""
        if self.image_condition == "latent_concat":
            return f"i2v-{self.in_channels}ch"
        return "i2v-token-replace" if self.image_condition == "token_replace" else "t2v"

    @classmethod
    def full(cls) -> "HunyuanVideoDiTConfig":
        """The released 13B HYVideo-T/2-cfgdistill (hunyuan-video-t2v-720p)."""
        return cls()

    @classmethod
    def tiny(cls) -> "HunyuanVideoDiTConfig":
        """A few-hundred-kB model with the same code paths, for tests and the shipped default weights."""
        return cls(
            in_channels=16, out_channels=16, hidden_size=64, heads_num=2, mlp_width_ratio=4.0,
            mm_double_blocks_depth=2, mm_single_blocks_depth=2, refiner_depth=2,
            rope_dim_list=default_rope_dims(32), text_states_dim=32, text_states_dim_2=24,
        )

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------- small layers


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps t [B] -> [B, dim], in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) / half * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


class MLPEmbedder(nn.Module):
    """Two linears with SiLU between; `in_layer`/`out_layer` names (vector_in)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size)
        self.out_layer = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """Two linears with SiLU between; `linear_1`/`linear_2` names (the refiner's c_embedder)."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class RMSNorm(nn.Module):
    """Per-head RMS norm of q/k (eps 1e-6), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # One reduction pass (vector_norm reads strided q/k views directly) and one fused scale pass; on the CPU
        # this is about twice as fast as F.rms_norm, which decomposes into copy, pow, mean and two multiplies.
        xf = x.float()
        inv_rms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(self.eps).rsqrt_()
        if x.dtype == torch.float32:
            return torch.mul(xf, inv_rms).mul_(self.weight)
        return torch.mul(xf, inv_rms).to(x.dtype) * self.weight


class Modulation(nn.Module):
    """adaLN: one linear from the (already SiLU-activated) conditioning vector to `factor` chunks of hidden."""

    def __init__(self, hidden_size: int, factor: int):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden_size, factor * hidden_size)

    def forward(self, vec_act):
        return self.linear(vec_act)[:, None, :].chunk(self.factor, dim=-1)


def norm_modulate(x, shift, scale):
    """LayerNorm without affine (eps 1e-6), then x * (1 + scale) + shift; shift/scale are [B, 1, C].

    With one batch item the modulation is exactly a LayerNorm affine, so it runs as a single fused kernel."""
    if x.shape[0] == 1:
        return F.layer_norm(x, (x.shape[-1],), (1 + scale).flatten(), shift.flatten(), eps=1e-6)
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=1e-6), 1 + scale)


@dataclass
class FirstFrame:
    """Token replace inside the blocks: the `tokens` leading video tokens (latent frame 0, or this rank's part of it)
    are modulated from `vec_act`, the activated conditioning vector of timestep 0."""
    vec_act: torch.Tensor
    tokens: int


def modulate_first(x, shift, scale, first_mods, tokens: int):
    """norm_modulate, the first `tokens` tokens with the timestep-0 (shift, scale) `first_mods` when given."""
    if first_mods is None or tokens == 0:
        return norm_modulate(x, shift, scale)
    return torch.cat((norm_modulate(x[:, :tokens], *first_mods), norm_modulate(x[:, tokens:], shift, scale)), dim=1)


def gate_first(x, y, gate, first_gate, tokens: int):
    """x + y * gate, the first `tokens` tokens gated by the timestep-0 `first_gate` when given."""
    if first_gate is None or tokens == 0:
        return torch.addcmul(x, y, gate)
    return torch.cat((torch.addcmul(x[:, :tokens], y[:, :tokens], first_gate),
                      torch.addcmul(x[:, tokens:], y[:, tokens:], gate)), dim=1)


def attention(q, k, v, mask, backend: str):
    """q, k, v [B, L, H, D] -> [B, L, H*D]. SDPA's CPU kernels return a [B, L, H, D]-contiguous tensor, so
    the final reshape is free. A `ShardedAttention` mask (video tokens split over ranks) runs the distributed
    attention of models/sequence_parallel.py instead."""
    if isinstance(mask, ShardedAttention):
        return mask(q, k, v, backend)
    return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, backend).transpose(1, 2).flatten(2)


def apply_rope_(x, freqs_cis):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, N, H, D] in place by complex freqs [N, 1, D/2]."""
    if x.dtype == torch.float32:
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        xc.mul_(freqs_cis)
    else:
        x.copy_(torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs_cis).flatten(-2))
    return x


def rope_freqs(grid: tuple[int, int, int], dims: tuple[int, ...], theta: float, device) -> torch.Tensor:
    """Complex rotary factors [T*H*W, 1, head_dim/2] for a (t, h, w) token grid; axis i uses dims[i] of the head."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).reshape(3, -1)  # [3, N]
    angles = []
    for i, d in enumerate(dims):
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device)[: d // 2] / d))
        angles.append(torch.outer(pos[i], inv))
    angles = torch.cat(angles, dim=1)
    return torch.polar(torch.ones_like(angles), angles)[:, None, :]


# --------------------------------------------------------------------------- text token refiner


class IndividualTokenRefinerBlock(nn.Module):
    attention_backend = "sdpa"

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.heads_num
        self.norm1 = nn.LayerNorm(h, eps=1e-6)
        self.self_attn_qkv = nn.Linear(h, 3 * h)
        self.self_attn_proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h, eps=1e-6)
        self.mlp = MLP(h, cfg.mlp_hidden, F.silu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, c, mask):
        gate_msa, gate_mlp = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        q, k, v = self.self_attn_qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        x = torch.addcmul(x, self.self_attn_proj(attention(q, k, v, mask, self.attention_backend)), gate_msa)
        return torch.addcmul(x, self.mlp(self.norm2(x)), gate_mlp)


class SingleTokenRefiner(nn.Module):
    """txt_in: project LLaMA states to hidden and refine them with self-attention conditioned on (t, mean text)."""

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.input_embedder = nn.Linear(cfg.text_states_dim, h)
        self.t_embedder = TimestepEmbedder(h)
        self.c_embedder = TextProjection(cfg.text_states_dim, h)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(
            IndividualTokenRefinerBlock(cfg) for _ in range(cfg.refiner_depth)
        )

    def forward(self, x, t, pooled, key_mask):
        c = self.t_embedder(t, x.dtype) + self.c_embedder(pooled)
        x = self.input_embedder(x)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, key_mask)
        return x


# --------------------------------------------------------------------------- transformer blocks


class MMDoubleStreamBlock(nn.Module):
    attention_backend = "sdpa"

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.heads_num
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6))
            setattr(self, f"{s}_attn_qkv", nn.Linear(h, 3 * h, bias=cfg.qkv_bias))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(hd))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(hd))
            setattr(self, f"{s}_attn_proj", nn.Linear(h, h, bias=cfg.qkv_bias))
            setattr(self, f"{s}_mlp", MLP(h, cfg.mlp_hidden, gelu_tanh))

    def _qkv(self, x, normed, stream: str):
        qkv = getattr(self, f"{stream}_attn_qkv")(normed)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        return getattr(self, f"{stream}_attn_q_norm")(q), getattr(self, f"{stream}_attn_k_norm")(k), v

    def forward(self, img, txt, vec_act, freqs_cis, mask, first: FirstFrame | None = None, probe: bool = False):
        """`first`: token replace (see FirstFrame). `probe`: return only the video tokens as the attention takes them
        in, normed and modulated (the step cache's probe, models/caching.py); txt, freqs_cis and mask are then unused."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec_act)
        f_shift1, f_scale1, f_gate1, f_shift2, f_scale2, f_gate2 = (
            self.img_mod(first.vec_act) if first is not None else (None,) * 6)
        n_first = 0 if first is None else first.tokens
        img_in = modulate_first(img, i_shift1, i_scale1, None if first is None else (f_shift1, f_scale1), n_first)
        if probe:
            return img_in
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec_act)
        iq, ik, iv = self._qkv(img, img_in, "img")
        tq, tk, tv = self._qkv(txt, norm_modulate(txt, t_shift1, t_scale1), "txt")
        n_img = img.shape[1]
        q, k, v = torch.cat((iq, tq), 1), torch.cat((ik, tk), 1), torch.cat((iv, tv), 1)
        apply_rope_(q[:, :n_img], freqs_cis)
        apply_rope_(k[:, :n_img], freqs_cis)
        attn = attention(q, k, v, mask, self.attention_backend)

        img = gate_first(img, self.img_attn_proj(attn[:, :n_img]), i_gate1, f_gate1, n_first)
        mlp_in = modulate_first(img, i_shift2, i_scale2, None if first is None else (f_shift2, f_scale2), n_first)
        img = gate_first(img, self.img_mlp(mlp_in), i_gate2, f_gate2, n_first)
        txt = torch.addcmul(txt, self.txt_attn_proj(attn[:, n_img:]), t_gate1)
        txt = torch.addcmul(txt, self.txt_mlp(norm_modulate(txt, t_shift2, t_scale2)), t_gate2)
        return img, txt


class MMSingleStreamBlock(nn.Module):
    """Parallel attention + MLP over [video; text]: linear1 -> (q, k, v, mlp_in); linear2 <- (attn, gelu(mlp_in))."""

    attention_backend = "sdpa"

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.hidden, self.mlp_hidden = cfg.heads_num, h, cfg.mlp_hidden
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h)
        self.q_norm = RMSNorm(cfg.head_dim)
        self.k_norm = RMSNorm(cfg.head_dim)
        self.modulation = Modulation(h, 3)

    def forward(self, x, vec_act, n_img, freqs_cis, mask, first: FirstFrame | None = None):
        """x: [video; text] tokens; `first`: token replace (see FirstFrame), on the leading video tokens."""
        shift, scale, gate = self.modulation(vec_act)
        f_shift, f_scale, f_gate = self.modulation(first.vec_act) if first is not None else (None,) * 3
        n_first = 0 if first is None else first.tokens
        normed = modulate_first(x, shift, scale, None if first is None else (f_shift, f_scale), n_first)
        qkv, mlp = self.linear1(normed).split((3 * self.hidden, self.mlp_hidden), dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        apply_rope_(q[:, :n_img], freqs_cis)
        apply_rope_(k[:, :n_img], freqs_cis)
        out = self.linear2(torch.cat((attention(q, k, v, mask, self.attention_backend), gelu_tanh(mlp)), dim=-1))
        return gate_first(x, out, gate, f_gate, n_first)


class FinalLayer(nn.Module):
    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        h = cfg.hidden_size
        self.linear = nn.Linear(h, math.prod(cfg.patch_size) * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(norm_modulate(x, shift, scale))


class PatchConv3d(nn.Conv3d):
    """A Conv3d with kernel == stride, run as one matmul over flattened patches (same weights and result):
    [B, C, T, H, W] -> tokens [B, N, hidden]."""

    def forward(self, x):
        b, c, t, h, w = x.shape
        pt, ph, pw = self.kernel_size
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
        return F.linear(x, self.weight.flatten(1), self.bias)


class PatchEmbed(nn.Module):
    """img_in: patches to tokens (the module level keeps the original checkpoints' `img_in.proj.*` names)."""

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        self.proj = PatchConv3d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x)


# --------------------------------------------------------------------------- the model


class HunyuanVideoDiT(nn.Module):
    """`parallel` (set after `init_process_group`, models/sequence_parallel.py): None runs in this process;
    ParallelGroups splits each call over the ranks (CFG halves, video-token slices), every rank returning the whole
    output."""

    parallel: ParallelGroups | None = None

    def __init__(self, cfg: HunyuanVideoDiTConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.img_in = PatchEmbed(cfg)
        self.txt_in = SingleTokenRefiner(cfg)
        self.time_in = TimestepEmbedder(h)
        self.vector_in = MLPEmbedder(cfg.text_states_dim_2, h)
        self.guidance_in = TimestepEmbedder(h) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(MMDoubleStreamBlock(cfg) for _ in range(cfg.mm_double_blocks_depth))
        self.single_blocks = nn.ModuleList(MMSingleStreamBlock(cfg) for _ in range(cfg.mm_single_blocks_depth))
        self.final_layer = FinalLayer(cfg)
        self._rope_cache: dict = {}

    def rope(self, grid: tuple[int, int, int], device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache.clear()  # one latent size at a time; keep memory flat when the size changes
            self._rope_cache[key] = rope_freqs(grid, self.config.rope_dim_list, self.config.rope_theta, device)
        return self._rope_cache[key]

    def offload_blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run: the units runtime/offload.py swaps in and out."""
        return [*self.double_blocks, *self.single_blocks]

    def compile_blocks(self) -> list[nn.Module]:
        """The blocks runtime/acceleration.py compiles (one compilation per class, shared by its instances)."""
        return [*self.double_blocks, *self.single_blocks]

    def forward(self, x, timestep, text_states, text_mask, text_states_2, guidance=None,
                step_cache: StepCacheHook | None = None, image_latent: torch.Tensor | None = None,
                token_replace: bool | None = None):
        """`image_latent` (latent_concat models): the channels joined to the noisy latent `x` [B, C, T, H, W], see
        `image_condition_channels`. `token_replace`: latent frame 0 of `x` is the clean image latent, modulated as at
        timestep 0 (None: as the config says)."""
        cfg = self.config
        if image_latent is not None:
            x = torch.cat((x, image_latent.to(device=x.device, dtype=x.dtype)), dim=1)
        if x.shape[1] != cfg.in_channels:
            what = {None: "a text-to-video model", "token_replace": "a token-replace image-to-video model",
                    "latent_concat": f"an image-to-video model ({cfg.out_channels} noisy latent channels + "
                                     f"{cfg.in_channels - cfg.out_channels} of the image)"}[cfg.image_condition]
            raise KineFlowError(f"this HunyuanVideo transformer is {what} and takes {cfg.in_channels} input channels; "
                                f"got {x.shape[1]}" + ("" if image_latent is not None or cfg.image_condition is None
                                                       else ": it needs Image To Video's conditioning"))
        if token_replace is None:
            token_replace = cfg.image_condition == "token_replace"
        if token_replace and cfg.image_condition == "latent_concat":
            raise KineFlowError("token replace is for 16-channel models (HunyuanVideo-I2V's token-replace release); "
                                "this one takes its image as concatenated latent channels")
        if self.parallel is not None:
            return self.parallel.run(self._forward, x, timestep, text_states, text_mask, text_states_2, guidance,
                                     step_cache, token_replace=token_replace)
        return self._forward(x, timestep, text_states, text_mask, text_states_2, guidance, step_cache,
                             token_replace=token_replace)

    def _forward(self, x, timestep, text_states, text_mask, text_states_2, guidance, step_cache,
                 batch_split: bool = False, token_replace: bool = False):
        """`batch_split`: this is one CFG-parallel group's half of the caller's batch."""
        cfg = self.config
        sp = self.parallel if self.parallel is not None and self.parallel.plan.sequence_degree > 1 else None
        b, _, t, hgt, wid = x.shape
        pt, ph, pw = cfg.patch_size
        if t % pt or hgt % ph or wid % pw:
            raise KineFlowError(
                f"latent size (T={t}, H={hgt}, W={wid}) must be divisible by the patch size {cfg.patch_size}"
            )
        grid = (t // pt, hgt // ph, wid // pw)
        timestep = torch.as_tensor(timestep, device=x.device).expand(b)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).expand(b)
        dtype = self.img_in.proj.weight.dtype  # the compute dtype (fp8 storage, if any, is on linears only)
        x, text_states, text_states_2 = x.to(dtype), text_states.to(dtype), text_states_2.to(dtype)

        # Conditioning vector shared by every block.
        vec = self.time_in(timestep, dtype) + self.vector_in(text_states_2)
        if self.guidance_in is not None:
            if guidance is None:
                raise KineFlowError(
                    "this HunyuanVideo model is guidance-distilled and needs a guidance value; got none"
                )
            vec = vec + self.guidance_in(guidance, dtype)
        vec_act = F.silu(vec)

        img = self.img_in(x)
        n_img = n_tokens = img.shape[1]
        n_first = grid[1] * grid[2]  # the video tokens of the first latent frame
        freqs = self.rope(grid, x.device)
        if sp is not None:  # this rank's slice of the video tokens; n_img counts the tokens this rank runs
            img, freqs = sp.shard_tokens(img, freqs)
            n_img = img.shape[1]
            n_first = min(max(n_first - sp.token_offset(n_img), 0), n_img)
        first = None
        if token_replace:  # as the I2V release: timestep 0 and the CLIP vector, no guidance term
            first_vec = self.time_in(torch.zeros_like(timestep), dtype) + self.vector_in(text_states_2)
            first = FirstFrame(F.silu(first_vec), n_first)
        residual = None
        if step_cache is not None:  # TeaCache's probe: what the first double block's attention takes in of the video
            probe = self.double_blocks[0](img, None, vec_act, None, None, first, probe=True)
            if self.parallel is not None:
                probe = self.parallel.gather_probe(probe, n_tokens, batch_split)
            residual = step_cache.reuse(probe)

        # Text: masked mean for the refiner's conditioning, then drop trailing all-padding columns. The decisions
        # read the mask where it lives (the CPU, as the text encoders give it: no device sync, and known values
        # in a dry run on `meta`); the arithmetic uses a copy on the compute device.
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.bool)
        counts = text_mask.bool().sum(dim=1, keepdim=True)
        if bool((counts == 0).any()):
            raise KineFlowError("text_mask marks no token as valid for some batch item; expected at least one")
        keep = int(text_mask.bool().any(dim=0).nonzero().max()) + 1
        all_valid = bool(text_mask[:, :keep].bool().all())
        valid = text_mask.to(x.device).bool()
        pooled = ((text_states.float() * valid[..., None]).sum(dim=1) / counts.to(x.device)).to(dtype)
        text_states, valid = text_states[:, :keep], valid[:, :keep]
        lengths = None if all_valid else right_padded_lengths(text_mask[:, :keep].bool())
        refiner_mask = None if all_valid else valid.clone()
        if refiner_mask is not None:
            refiner_mask[:, 0] = True  # as the original: a query never sees an empty key set
            refiner_mask = _key_mask(refiner_mask, lengths)

        joint_mask = None
        if sp is not None:
            joint_mask = ShardedAttention(sp, n_tokens, n_img, None if all_valid else valid, lengths)
        elif not all_valid:
            img_valid = torch.ones(b, n_img, dtype=torch.bool, device=x.device)
            joint_mask = _key_mask(torch.cat((img_valid, valid), dim=1),
                                   None if lengths is None else tuple(n_img + n for n in lengths))

        if residual is None:
            blocks_in = img
            txt = self.txt_in(text_states, timestep, pooled, refiner_mask)  # only the blocks read the text
            for block in self.double_blocks:
                img, txt = block(img, txt, vec_act, freqs, joint_mask, first)
            x = torch.cat((img, txt), dim=1)
            for block in self.single_blocks:
                x = block(x, vec_act, n_img, freqs, joint_mask, first)
            img = x[:, :n_img]
            if step_cache is not None:
                step_cache.store(img - blocks_in)
        else:
            img = img + residual
        out = self.final_layer(img, vec)
        if sp is not None:
            out = sp.gather_tokens(out, n_tokens)

        # Unpatchify: channels of each token are ordered (c, pt, ph, pw).
        tt, th, tw = grid
        out = out.reshape(b, tt, th, tw, cfg.out_channels, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return out.reshape(b, cfg.out_channels, tt * pt, th * ph, tw * pw)


def _key_mask(valid: torch.Tensor, lengths: tuple[int, ...] | None):
    """The attention mask hiding the keys `valid` [B, L] marks False: KeyPadding when they are right padding
    (`lengths` real keys per item), else a dense boolean mask."""
    dense = valid[:, None, None, :]
    return dense if lengths is None else KeyPadding(dense, lengths)


def image_condition_channels(cfg: HunyuanVideoDiTConfig, image: torch.Tensor, frames: int) -> torch.Tensor:
    """The channels a latent_concat model takes after the noisy latent, for `frames` latent frames: the image's
    latent `image` [B, C, 1, H, W] in frame 0 and zeros in the others, then (HunyuanVideo-I2V 33ch) a mask channel,
    1 in frame 0 and 0 elsewhere. SkyReels-V1 (32 channels) has no mask."""
    if cfg.image_condition != "latent_concat":
        raise KineFlowError(f"image channels are for latent_concat models; this one is {cfg.variant}")
    b, c, t, h, w = image.shape
    if c != cfg.out_channels or t != 1:
        raise KineFlowError(f"expected the image latent [B, {cfg.out_channels}, 1, H, W]; found {tuple(image.shape)}")
    latent = image.new_zeros(b, c, frames, h, w)
    latent[:, :, :1] = image
    if not cfg.image_mask_channel:
        return latent
    mask = image.new_zeros(b, 1, frames, h, w)
    mask[:, :, :1] = 1.0
    return torch.cat((latent, mask), dim=1)


# --------------------------------------------------------------------------- checkpoint layouts

# Key prefixes some files put in front of the transformer's own keys (ComfyUI full saves, DDP wrappers).
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.")


def unwrap_checkpoint(obj: dict) -> dict:
    """The tensor dict inside a loaded file: the original .pt nests it under "module" (or "ema")."""
    for wrapper in ("module", "ema", "state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            return obj[wrapper]
    return obj


def _strip_prefix(keys) -> str:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "img_in.") or k.startswith(prefix + "x_embedder.") for k in keys):
            return prefix
    return ""


def detect_layout(keys) -> str | None:
    """"original" (Tencent), "comfy" (ComfyUI-internal names) or "diffusers"; None if not a HunyuanVideo DiT."""
    keys = set(keys)  # a {"module": {...}} wrapper has no model keys: call unwrap_checkpoint first
    prefix = _strip_prefix(keys)
    keys = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    if "txt_in.input_embedder.weight" in keys and "img_in.proj.weight" in keys:
        if "time_in.mlp.0.weight" in keys:
            return "original"
        if "time_in.in_layer.weight" in keys:
            return "comfy"
    if "context_embedder.proj_in.weight" in keys and "x_embedder.proj.weight" in keys:
        return "diffusers"
    return None


# ComfyUI -> original: pure renames (applied in order, each to the whole key).
_COMFY_RULES = [
    (r"_attn\.qkv\.", "_attn_qkv."),
    (r"_attn\.proj\.", "_attn_proj."),
    (r"_attn\.norm\.query_norm\.scale$", "_attn_q_norm.weight"),
    (r"_attn\.norm\.key_norm\.scale$", "_attn_k_norm.weight"),
    (r"\.norm\.query_norm\.scale$", ".q_norm.weight"),
    (r"\.norm\.key_norm\.scale$", ".k_norm.weight"),
    (r"self_attn\.qkv\.", "self_attn_qkv."),
    (r"self_attn\.proj\.", "self_attn_proj."),
    (r"_mod\.lin\.", "_mod.linear."),
    (r"\.modulation\.lin\.", ".modulation.linear."),
    (r"mlp\.0\.", "mlp.fc1."),
    (r"mlp\.2\.", "mlp.fc2."),
    (r"^txt_in\.c_embedder\.in_layer\.", "txt_in.c_embedder.linear_1."),
    (r"^txt_in\.c_embedder\.out_layer\.", "txt_in.c_embedder.linear_2."),
    (r"^(time_in|guidance_in|txt_in\.t_embedder)\.in_layer\.", r"\1.mlp.0."),
    (r"^(time_in|guidance_in|txt_in\.t_embedder)\.out_layer\.", r"\1.mlp.2."),
]

# diffusers -> original: (regex on the diffusers key, original key template, part index of a fused tensor).
# Fused targets are concatenated along dim 0 in part order (q, k, v[, mlp_in]).
_DIFFUSERS_RULES = [
    (r"x_embedder\.proj\.(\w+)", "img_in.proj.{0}", None),
    (r"context_embedder\.proj_in\.(\w+)", "txt_in.input_embedder.{0}", None),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_1\.(\w+)", "txt_in.t_embedder.mlp.0.{0}", None),
    (r"context_embedder\.time_text_embed\.timestep_embedder\.linear_2\.(\w+)", "txt_in.t_embedder.mlp.2.{0}", None),
    (r"context_embedder\.time_text_embed\.text_embedder\.linear_(1|2)\.(\w+)", "txt_in.c_embedder.linear_{0}.{1}", None),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.(norm1|norm2)\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.{1}.{2}", None),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_q\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 0),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_k\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 1),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_v\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.self_attn_qkv.{1}", 2),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.self_attn_proj.{1}", None),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.mlp.fc1.{1}", None),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.ff\.net\.2\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.mlp.fc2.{1}", None),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.norm_out\.linear\.(\w+)", "txt_in.individual_token_refiner.blocks.{0}.adaLN_modulation.1.{1}", None),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", "time_in.mlp.0.{0}", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", "time_in.mlp.2.{0}", None),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(\w+)", "guidance_in.mlp.0.{0}", None),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(\w+)", "guidance_in.mlp.2.{0}", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", "vector_in.in_layer.{0}", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", "vector_in.out_layer.{0}", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q\.(\w+)", "double_blocks.{0}.img_attn_qkv.{1}", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k\.(\w+)", "double_blocks.{0}.img_attn_qkv.{1}", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v\.(\w+)", "double_blocks.{0}.img_attn_qkv.{1}", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(\w+)", "double_blocks.{0}.txt_attn_qkv.{1}", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.(\w+)", "double_blocks.{0}.txt_attn_qkv.{1}", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.(\w+)", "double_blocks.{0}.txt_attn_qkv.{1}", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "double_blocks.{0}.img_attn_q_norm.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "double_blocks.{0}.img_attn_k_norm.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", "double_blocks.{0}.txt_attn_q_norm.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", "double_blocks.{0}.txt_attn_k_norm.weight", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", "double_blocks.{0}.img_attn_proj.{1}", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", "double_blocks.{0}.txt_attn_proj.{1}", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", "double_blocks.{0}.img_mod.linear.{1}", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", "double_blocks.{0}.txt_mod.linear.{1}", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", "double_blocks.{0}.img_mlp.fc1.{1}", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", "double_blocks.{0}.img_mlp.fc2.{1}", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", "double_blocks.{0}.txt_mlp.fc1.{1}", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", "double_blocks.{0}.txt_mlp.fc2.{1}", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q\.(\w+)", "single_blocks.{0}.linear1.{1}", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k\.(\w+)", "single_blocks.{0}.linear1.{1}", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v\.(\w+)", "single_blocks.{0}.linear1.{1}", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp\.(\w+)", "single_blocks.{0}.linear1.{1}", 3),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(\w+)", "single_blocks.{0}.linear2.{1}", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", "single_blocks.{0}.q_norm.weight", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", "single_blocks.{0}.k_norm.weight", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(\w+)", "single_blocks.{0}.modulation.linear.{1}", None),
    (r"norm_out\.linear\.(\w+)", "final_layer.adaLN_modulation.1.{0}", "swap"),
    (r"proj_out\.(\w+)", "final_layer.linear.{0}", None),
]
_DIFFUSERS_COMPILED = [(re.compile(p + "$"), t, part) for p, t, part in _DIFFUSERS_RULES]


def _convert_diffusers(sd: dict) -> dict:
    out, fused = {}, {}
    for key, tensor in sd.items():
        for pattern, template, part in _DIFFUSERS_COMPILED:
            m = pattern.match(key)
            if m:
                break
        else:
            raise ModelFileError(f"unexpected key {key!r} in a diffusers-layout HunyuanVideo transformer")
        target = template.format(*m.groups())
        if part == "swap":  # diffusers stores the final adaLN as [scale, shift]; the original as [shift, scale]
            scale, shift = tensor.chunk(2, dim=0)
            out[target] = torch.cat((shift, scale), dim=0)
        elif part is None:
            out[target] = tensor
        else:
            fused.setdefault(target, {})[part] = tensor
    for target, parts in fused.items():
        expected = 4 if ".linear1." in target else 3
        if sorted(parts) != list(range(expected)):
            raise ModelFileError(
                f"{target!r} needs {expected} split parts in the diffusers file; found parts {sorted(parts)}"
            )
        out[target] = torch.cat([parts[i] for i in range(expected)], dim=0)
    return out


def convert_state_dict(sd: dict, layout: str) -> dict:
    """Any supported layout -> the internal (original Tencent) key layout. Works on meta tensors too."""
    prefix = _strip_prefix(sd.keys())
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if layout == "original":
        return dict(sd)
    if layout == "comfy":
        out = {}
        for key, tensor in sd.items():
            for pattern, repl in _COMFY_RULES:
                key = re.sub(pattern, repl, key)
            out[key] = tensor
        return out
    if layout == "diffusers":
        return _convert_diffusers(sd)
    raise ValueError(f"unknown HunyuanVideo DiT layout {layout!r}; expected 'original', 'comfy' or 'diffusers'")


def config_from_state_dict(shapes: dict, image_condition: str | None = None) -> HunyuanVideoDiTConfig:
    """Derive the config from internal-layout key -> shape (tuples, torch.Size or tensors).

    The image conditioning follows from the input projection: twice the output channels (+1 for a mask) is
    latent_concat. A token-replace model has the text-to-video shapes, so only `image_condition` (what the file's
    metadata declares) can say so."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in shapes.items()}

    def need(key):
        if key not in shapes:
            raise ModelFileError(f"HunyuanVideo transformer weights lack {key!r}; is this the right file?")
        return shapes[key]

    def count(pattern):
        rx = re.compile(pattern)
        return len({m.group(1) for k in shapes if (m := rx.match(k))})

    patch_w = need("img_in.proj.weight")
    hidden, in_channels, patch = patch_w[0], patch_w[1], patch_w[2:]
    n_double = count(r"double_blocks\.(\d+)\.")
    n_single = count(r"single_blocks\.(\d+)\.")
    if n_double:
        head_dim = need("double_blocks.0.img_attn_q_norm.weight")[0]
        mlp_hidden = need("double_blocks.0.img_mlp.fc1.weight")[0]
    elif n_single:
        head_dim = need("single_blocks.0.q_norm.weight")[0]
        mlp_hidden = need("single_blocks.0.linear1.weight")[0] - 3 * hidden
    else:
        raise ModelFileError("HunyuanVideo transformer weights have neither double_blocks nor single_blocks")
    out_channels = need("final_layer.linear.weight")[0] // math.prod(patch)
    if in_channels in (2 * out_channels, 2 * out_channels + 1):
        image_condition = "latent_concat"
    elif image_condition == "latent_concat":
        raise ModelFileError(f"the file declares latent_concat image conditioning, but its input projection takes "
                             f"{in_channels} channels for {out_channels} output channels; expected "
                             f"{2 * out_channels} or {2 * out_channels + 1}")
    return HunyuanVideoDiTConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        patch_size=patch,
        hidden_size=hidden,
        heads_num=hidden // head_dim,
        mlp_width_ratio=mlp_hidden / hidden,
        mm_double_blocks_depth=n_double,
        mm_single_blocks_depth=n_single,
        refiner_depth=count(r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."),
        rope_dim_list=default_rope_dims(head_dim),
        text_states_dim=need("txt_in.input_embedder.weight")[1],
        text_states_dim_2=need("vector_in.in_layer.weight")[1],
        guidance_embed="guidance_in.mlp.0.weight" in shapes,
        qkv_bias=n_double == 0 or "double_blocks.0.img_attn_qkv.bias" in shapes,
        image_condition=image_condition,
    )
