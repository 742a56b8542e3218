"""Dequantization of GGUF tensors in torch: the stored bytes of a tensor, and its values from GGML blocks.

KineFlow keeps quantized nn.Linear weights as their raw bytes (uint8) in memory and dequantizes one layer at a
time when it runs (models/weights.py), on whatever device the bytes are. Headers: models/gguf.py.

Block layouts (little-endian; d/dmin/m are float16):
  Q8_0  32 values: d, int8 q[32]                              x = d*q
  Q4_0  32 values: d, q[16] (low nibbles 0..15, high 16..31)   x = d*(q-8)
  Q4_1  32 values: d, m, q[16]                                 x = d*q + m
  Q5_0  32 values: d, qh (32 fifth bits), q[16]                x = d*(q + 16*bit - 16)
  Q5_1  32 values: d, m, qh, q[16]                             x = d*(q + 16*bit) + m
  Q4_K 256 values: d, dmin, 12 bytes of 6-bit scales/mins for 8 groups of 32, q[128]   x = d*sc*q - dmin*mn
  Q5_K 256 values: d, dmin, scales[12], qh[32], q[128]          as Q4_K with a fifth bit
  Q6_K 256 values: ql[128], qh[64], int8 scales[16], d          x = d*sc*(q6 - 32), 16 groups of 16
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelFileError
from .gguf import BLOCKS, SUPPORTED, storage_bytes

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_raw(info) -> torch.Tensor:
    """The stored bytes of one tensor (uint8), read with one positioned read."""
    raw = torch.empty(storage_bytes(info.dtype, info.numel), dtype=torch.uint8)
    with open(info.file, "rb", buffering=0) as f:
        got = os.preadv(f.fileno(), [memoryview(raw.numpy())], info.offset)
    if got != raw.numel():
        raise ModelFileError(f"{Path(info.file).name!r} ended early reading a tensor of {raw.numel()} bytes")
    return raw


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte `start` of each block, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] values: the low nibbles, then the high nibbles."""
    return torch.cat([q & 0x0F, q >> 4], dim=1)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (K-quants), as [n, 8] each."""
    s = scales.to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` bits of little-endian bytes [n, k] as [n, count] (0/1)."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.int32)
    return ((qh.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], -1)[:, :count]


def _dequantize_blocks(b: torch.Tensor, qtype: str) -> torch.Tensor:
    """[n_blocks, block_bytes] uint8 -> [n_blocks, values] float32."""
    if qtype == "Q8_0":
        return _half(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()
    if qtype == "Q4_0":
        return _half(b, 0) * (_nibbles(b[:, 2:18]).float() - 8)
    if qtype == "Q4_1":
        return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)
    if qtype in ("Q5_0", "Q5_1"):
        start = 2 if qtype == "Q5_0" else 4
        q = _nibbles(b[:, start + 4:start + 20]).float() + 16 * _bits(b[:, start:start + 4], 32).float()
        return _half(b, 0) * (q - 16) if qtype == "Q5_0" else _half(b, 0) * q + _half(b, 2)
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _half(b, 0), _half(b, 2)
        sc, mn = _scale_min_k4(b[:, 4:16])
        qs = b[:, 16:144] if qtype == "Q4_K" else b[:, 48:176]
        # 4 chunks of 32 bytes: low nibbles are group 2i, high nibbles group 2i+1
        q = torch.stack([qs.reshape(-1, 4, 32) & 0x0F, qs.reshape(-1, 4, 32) >> 4], dim=2).reshape(-1, 8, 32).float()
        if qtype == "Q5_K":
            high = _bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(1, 2)  # bit g of byte l -> group g
            q = q + 16 * high.float()
        return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q - dmin.unsqueeze(-1) * mn.unsqueeze(-1)).reshape(-1, 256)
    if qtype == "Q6_K":
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32).to(torch.int32)
        scales = b[:, 192:208].contiguous().view(torch.int8).float().reshape(-1, 2, 8)
        low = torch.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2)
        high = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
        q = (low.to(torch.int32) | (high << 4)).float() - 32  # [n, half, 4 quarters, 32]
        scale = scales.reshape(-1, 2, 4, 2).repeat_interleave(16, dim=3)  # groups of 16 within each quarter
        return (_half(b, 208).reshape(-1, 1, 1, 1) * scale * q).reshape(-1, 256)
    raise ModelFileError(f"GGUF type {qtype} cannot be dequantized; supported: {', '.join(SUPPORTED)}")


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Stored bytes of one tensor -> its values, `shape` in `dtype`, on the bytes' device."""
    if qtype in _FLOAT_DTYPES:
        return raw.view(_FLOAT_DTYPES[qtype]).reshape(shape).to(dtype)
    values, nbytes = BLOCKS[qtype]
    return _dequantize_blocks(raw.reshape(-1, nbytes), qtype).reshape(shape).to(dtype)
