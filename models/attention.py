"""Attention for every model of the pack: one dispatch point in front of several kernels.

Every attention in models/ calls `attend(q, k, v, mask, backend)` on `[B, heads, L, head_dim]` tensors; no model
calls a kernel itself. Backends (the names are `models.ATTENTION_BACKENDS`):

- `sdpa`: PyTorch's `scaled_dot_product_attention`, which picks its kernel itself.
- `sdpa_math`: the same with PyTorch's plain math kernel forced (`torch.nn.attention.sdpa_kernel`): the reference
  to compare a faster kernel against.
- `tiled`: for bf16 on the CPU: bf16 matmuls over tiles of TILE_ROWS queries (as many heads at once as keep a
  tile's scores within TILE_SCORE_BYTES, so they stay in the CPU's cache) with a softmax that sums in fp32. torch's
  fused CPU kernel computes in fp32 inside, so it takes as long in bf16 as in fp32; on a CPU that multiplies bf16
  natively the tiles are faster, from the benchmark's 2,240 tokens to full-size HunyuanVideo's tens of thousands
  (benchmarks/bench_hunyuan_dit.py, benchmarks/bench_attention.py), for the memory of one more copy of the keys and
  of the values per call. Masks other than right padding go to sdpa.
- `sageattention`, `flash_attn`, `xformers`: the packages of those names, on CUDA devices, used only when installed.
- `auto`: per call, the first of sageattention, flash_attn and xformers that is installed and can run the call,
  then `tiled` where the runtime enabled it (`use_cpu_tiles`: a CPU with native bf16 matmul) for calls big enough
  to repay the tiles' per-tile dispatch (`tiles_pay`), else sdpa. The tiles win there on one thread and on two,
  idle or busy (README "Benchmarks"); inside a torch.compile graph `auto` keeps the fused kernel, which is what the
  compiled blocks were measured with.

A backend runs the calls it can express (device, dtype, head size, mask); any other call goes to sdpa, so choosing
a backend never makes a model fail. Masks are None, a boolean tensor broadcastable to `[B, heads, Lq, Lk]` (True:
attend), or `KeyPadding`: right-padded keys, which the packed-sequence ("varlen") kernels of flash_attn and
sageattention and xformers' block-diagonal mask run without a dense mask.

The backend is chosen per model: every module that attends has an `attention_backend` attribute ("sdpa" unless
`set_backend` says otherwise). A plain attribute follows the model through deep copies (LoRA merges), offloading
(which moves weights only) and torch.compile (a compiled block reads it and guards on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import InputFileError
from . import ATTENTION_BACKENDS


@dataclass(frozen=True)
class KeyPadding:
    """Keys at and after `lengths[b]` are padding for batch item b (right-padded text); `mask` says the same as a
    boolean tensor broadcastable to [B, heads, Lq, Lk], for the kernels that take one. `lengths` are host integers:
    a kernel takes its decisions from them without reading the device."""

    mask: torch.Tensor
    lengths: tuple[int, ...]


@dataclass(frozen=True)
class Backend:
    """A kernel behind `attend`: `run(q, k, v, mask)` for the calls `accepts(q, k, mask)` allows."""

    name: str
    run: Callable[..., torch.Tensor]
    accepts: Callable[..., bool] = lambda q, k, mask: True


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | KeyPadding | None = None,
           backend: str = "sdpa") -> torch.Tensor:
    """Attention of q [B, H, Lq, D] over k, v [B, H, Lk, D] -> [B, H, Lq, D], by `backend` (see the module
    docstring); a call the backend cannot run goes to sdpa."""
    for candidate in _chain(backend):
        if candidate.accepts(q, k, mask):
            return candidate.run(q, k, v, mask)
    return _sdpa(q, k, v, mask)


def attend_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | KeyPadding | None = None,
                   score_bytes: int = 1 << 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one block of the keys, with the log-sum-exp of its scores: (out [B, H, Lq, D],
    lse [B, H, Lq]), both float32; what ring attention merges block by block. A query whose keys are all masked
    gets out 0 and lse -inf. A math kernel (no fused kernel of torch returns the log-sum-exp on every device),
    run over chunks of the queries so that no more than `score_bytes` of scores exist at once."""
    mask = _dense(mask)
    b, h, n, _ = q.shape
    rows = max(1, score_bytes // (4 * b * h * k.shape[-2]))
    out = torch.empty(b, h, n, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    keys, values = k.float().transpose(-1, -2), v.float()
    for start in range(0, n, rows):
        chunk = slice(start, start + rows)
        scores = torch.matmul(q[:, :, chunk].float(), keys).mul_(q.shape[-1] ** -0.5)
        if mask is not None:
            scores.masked_fill_(~(mask[:, :, chunk] if mask.shape[-2] > 1 else mask), float("-inf"))
        peak = scores.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        weights = scores.sub_(peak).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        out[:, :, chunk] = torch.matmul(weights, values) / total.clamp_min(torch.finfo(torch.float32).tiny)
        lse[:, :, chunk] = (peak + total.log()).squeeze(-1)
    return out, lse


def set_backend(model: nn.Module, name: str) -> None:
    """Make every attention of `model` use backend `name` (its package is imported now, not while the model runs)."""
    _chain(name)
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = name


def check(name: str, device: torch.device) -> None:
    """Raise a clear error when `name` cannot serve a model computing on `device`: an unknown name, a package
    that is not installed (or fails to import), or a CUDA-only kernel for another device (a dry run on `meta`
    passes: it computes nothing)."""
    _chain(name)
    if name in _OPTIONAL and torch.device(device).type not in ("cuda", "meta"):  # all three are CUDA kernels
        raise InputFileError(f"attention backend {name!r} runs on CUDA GPUs only; the compute device is "
                             f"{torch.device(device).type}. Choose 'auto' or 'sdpa'")


def register(backend: Backend) -> None:
    """Make `backend` selectable by its name (a kernel outside the built-in list, or a test's)."""
    _ready[backend.name] = (backend,)


def right_padded_lengths(valid: torch.Tensor) -> tuple[int, ...] | None:
    """Per row of a boolean key mask [B, L] on the host, how many leading keys are real, if every row is real keys
    followed by padding only; else None."""
    lengths = valid.sum(dim=1)
    prefix = torch.arange(valid.shape[1], device=valid.device) < lengths[:, None]
    return tuple(int(n) for n in lengths) if bool((valid == prefix).all()) else None


# --------------------------------------------------------------------------- torch's kernels
def _dense(mask: torch.Tensor | KeyPadding | None) -> torch.Tensor | None:
    return mask.mask if isinstance(mask, KeyPadding) else mask


def _sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(mask))


def _sdpa_math(q, k, v, mask):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(mask))


# --------------------------------------------------------------------------- query tiles (bf16 on the CPU)
TILE_ROWS = 64  # queries per tile
TILE_SCORE_BYTES = 4 << 20  # a tile takes as many heads as keep its scores (counted at 4 bytes) within this; >= 1
# `auto` keeps sdpa below this many multiply-adds per thread in the scores of TILE_ROWS queries (all heads)
AUTO_MIN_TILE_WORK = 1 << 22


def _tiles_fit(q, k, mask) -> bool:
    padded = isinstance(mask, KeyPadding) and min(mask.lengths) > 0  # no query without a key
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and (mask is None or padded)


def tiles_pay(q, k) -> bool:
    """Whether a call is big enough for the tiles to beat the fused kernel (benchmarks/bench_attention.py): each tile
    costs a few Python-dispatched kernels, which small calls (the tiny models' 20-token text, 200-token video) do not
    repay, and a matmul over a few keys (the motion modules' 16 frames) runs far below the matmul peak."""
    b, h, n, d = q.shape
    keys = k.shape[-2]
    return keys >= TILE_ROWS and b * h * min(TILE_ROWS, n) * keys * d >= AUTO_MIN_TILE_WORK * torch.get_num_threads()


def _tiled(q, k, v, mask):
    b, h, n, d = q.shape
    keys, batch_heads = k.shape[-2], b * h
    queries = q.reshape(batch_heads, n, d)
    # One contiguous copy each of the scaled keys (transposed) and the values up front: bmm would otherwise copy the
    # strided [B, L, H, D] views once per tile.
    keys_t = torch.empty(batch_heads, d, keys, dtype=k.dtype)
    torch.mul(k.reshape(batch_heads, keys, d).transpose(1, 2), d ** -0.5, out=keys_t)
    values = v.reshape(batch_heads, keys, v.shape[-1]).contiguous()
    padding = None
    if mask is not None:  # True where a key is padding, per batch item, for every head
        padding = (torch.arange(keys) >= torch.tensor(mask.lengths)[:, None]).repeat_interleave(h, dim=0)[:, None]
    out = torch.empty(batch_heads, n, v.shape[-1], dtype=q.dtype)
    group = max(1, min(batch_heads, TILE_SCORE_BYTES // (4 * TILE_ROWS * keys)))  # heads per tile
    for first in range(0, batch_heads, group):
        heads = slice(first, first + group)
        for start in range(0, n, TILE_ROWS):
            rows = slice(start, start + TILE_ROWS)
            scores = torch.bmm(queries[heads, rows], keys_t[heads])
            if padding is not None:
                scores.masked_fill_(padding[heads], float("-inf"))
            # torch's CPU softmax of bf16 sums in fp32 and rounds once: an fp32 softmax without a separate cast
            torch.bmm(torch.softmax(scores, dim=-1), values[heads], out=out[heads, rows])
    return out.reshape(b, h, n, v.shape[-1])


TILED = Backend("tiled", _tiled, _tiles_fit)
# What `auto` adds when use_cpu_tiles enabled it: the tiles for calls big enough to repay them, except inside a
# compiled graph.
AUTO_TILED = Backend("tiled", _tiled, lambda q, k, mask: (not torch.compiler.is_compiling() and _tiles_fit(q, k, mask)
                                                         and tiles_pay(q, k)))
_cpu_tiles = False


def use_cpu_tiles(enabled: bool) -> None:
    """Let `auto` run bf16 CPU calls with the `tiled` backend: the runtime enables it on CPUs that multiply bf16
    natively (elsewhere bf16 matmuls are emulated and the tiles are no gain)."""
    global _cpu_tiles
    if enabled != _cpu_tiles:
        _cpu_tiles = enabled
        _ready.pop("auto", None)


# --------------------------------------------------------------------------- packed sequences
def _segments(lengths: tuple[int, ...], length: int) -> list[int]:
    """The sequences of a packed batch: per item its real tokens, then its padding (empty ones left out)."""
    return [n for real in lengths for n in (real, length - real) if n > 0]


def _packable(q, k, mask) -> bool:
    """A call a packed-sequence kernel can run: no mask, or right-padded self-attention."""
    return mask is None or (isinstance(mask, KeyPadding) and q.shape[-2] == k.shape[-2])


def _varlen(kernel, q, k, v, padding: KeyPadding) -> torch.Tensor:
    """Self-attention over right-padded tokens with a packed-sequence kernel of flash_attn's `*_varlen_func`
    signature. As in the original HunyuanVideo code, each item's real tokens are one sequence and its padding
    another: real queries see exactly the real keys; padded queries, whose outputs no real token reads, see the
    padding."""
    b, h, n, d = q.shape
    bounds = [0]
    for size in _segments(padding.lengths, n):
        bounds.append(bounds[-1] + size)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    packed = [t.transpose(1, 2).reshape(b * n, h, d) for t in (q, k, v)]
    out = kernel(*packed, cu_seqlens, cu_seqlens, n, n)
    return out.reshape(b, n, h, d).transpose(1, 2)


def _half_cuda(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- optional packages
def _sageattention() -> Backend:
    import sageattention

    varlen = getattr(sageattention, "sageattn_varlen", None)  # not in every release

    def run(q, k, v, mask):
        if mask is None:
            return sageattention.sageattn(q, k, v, tensor_layout="HND")
        return _varlen(varlen, q, k, v, mask)

    def accepts(q, k, mask):
        return _half_cuda(q) and q.shape[-1] <= 128 and (mask is None or (varlen is not None and _packable(q, k, mask)))

    return Backend("sageattention", run, accepts)


def _flash_attn() -> Backend:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def run(q, k, v, mask):
        if mask is None:
            return flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return _varlen(flash_attn_varlen_func, q, k, v, mask)

    def accepts(q, k, mask):
        return _half_cuda(q) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and _packable(q, k, mask)

    return Backend("flash_attn", run, accepts)


def _xformers() -> Backend:
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    def run(q, k, v, mask):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers' layout: [B, L, H, D]
        if mask is None:
            return memory_efficient_attention(q, k, v).transpose(1, 2)
        b, n, h, d = q.shape
        bias = BlockDiagonalMask.from_seqlens(_segments(mask.lengths, n))
        out = memory_efficient_attention(*(t.reshape(1, b * n, h, d) for t in (q, k, v)), attn_bias=bias)
        return out.reshape(b, n, h, d).transpose(1, 2)

    def accepts(q, k, mask):
        return q.is_cuda and q.shape[-1] <= 256 and _packable(q, k, mask)

    return Backend("xformers", run, accepts)


# name -> (loader, pip package); the loader imports the package and returns the ready Backend.
_OPTIONAL = {"sageattention": (_sageattention, "sageattention"), "flash_attn": (_flash_attn, "flash-attn"),
             "xformers": (_xformers, "xformers")}
SDPA = Backend("sdpa", _sdpa)
# Backend chains by name, filled on first use: what `attend` walks. An optional package is imported once.
_ready: dict[str, tuple[Backend, ...]] = {"sdpa": (SDPA,), "sdpa_math": (Backend("sdpa_math", _sdpa_math),),
                                          "tiled": (TILED,)}
_missing: dict[str, str] = {}  # optional backend -> why it cannot be imported


def _load(name: str) -> Backend | None:
    if name not in _ready and name not in _missing:
        loader, _package = _OPTIONAL[name]
        try:
            _ready[name] = (loader(),)
        except Exception as exc:  # not installed, or built for another torch/CUDA: an import error of any kind
            _missing[name] = f"{type(exc).__name__}: {exc}"
    return _ready[name][0] if name in _ready else None


def _chain(name: str) -> tuple[Backend, ...]:
    chain = _ready.get(name)
    if chain is not None:
        return chain
    if name == "auto":
        installed = tuple(b for b in map(_load, _OPTIONAL) if b is not None)
        _ready["auto"] = installed + ((AUTO_TILED,) if _cpu_tiles else ())
        return _ready["auto"]
    if name not in _OPTIONAL:
        raise InputFileError(f"unknown attention backend {name!r}; expected one of {', '.join(ATTENTION_BACKENDS)}")
    if _load(name) is None:
        raise InputFileError(
            f"attention backend {name!r} was chosen but cannot be imported ({_missing[name]}); install it "
            f"(pip install {_OPTIONAL[name][1]}) or choose 'auto' or 'sdpa'")
    return _ready[name]

