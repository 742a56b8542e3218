"""Seeded noise: one seed gives one video on every device and for every batch size.

Noise is always drawn on the CPU in float32 from `torch.Generator().manual_seed(...)` and only then moved
and cast, so CUDA, MPS and CPU runs start from the same tensor.

Batch entries are independent: entry `i` of a batch is drawn from its own generator seeded with
`seed + i` (mod 2**64). So entry 0 never depends on the batch size, and entry `i` of a batch equals a
single run with seed `seed + i` (the same habit as A1111's "batch = consecutive seeds"). This differs from
ComfyUI, which draws the whole batch from one stream.

Ancestral samplers need fresh noise at each step. `step_generators(seed, batch)` gives one generator per
entry seeded with splitmix64(seed + i), a different stream from the initial noise of any nearby seed.
`draw_noise` accepts one generator (the whole shape from one stream, as diffusers does), a list of
generators (one per batch entry, as diffusers' `randn_tensor` does) or None (torch's global CPU RNG).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import KineFlowError

_U64 = (1 << 64) - 1


def _seed64(seed: int) -> int:
    if int(seed) != seed:
        raise KineFlowError(f"seed must be a whole number, got {seed!r}")
    return int(seed) & _U64


def splitmix64(value: int) -> int:
    """A 64-bit mixing function (Steele et al.): nearby inputs give unrelated outputs."""
    z = (value + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def entry_generators(seed: int, batch_size: int) -> list[torch.Generator]:
    """One CPU generator per batch entry for the initial noise: entry i is seeded with seed + i."""
    base = _seed64(seed)
    return [torch.Generator().manual_seed((base + i) & _U64) for i in range(batch_size)]


def step_generators(seed: int, batch_size: int) -> list[torch.Generator]:
    """One CPU generator per batch entry for ancestral step noise, seeded with splitmix64(seed + i)."""
    base = _seed64(seed)
    return [torch.Generator().manual_seed(splitmix64((base + i) & _U64)) for i in range(batch_size)]


def draw_noise(
    shape: Sequence[int],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the CPU in float32, then moved to `device` / `dtype`."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, torch.Generator) or generator is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    else:
        generators = list(generator)
        if len(generators) != shape[0]:
            raise KineFlowError(
                f"expected one noise generator per batch entry ({shape[0]}), got {len(generators)}"
            )
        noise = torch.cat(
            [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32, device="cpu") for g in generators]
        )
    return noise.to(device=device, dtype=dtype)


def seeded_noise(
    shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Initial latent noise for `seed`: batch entry i comes from its own stream seeded with seed + i."""
    if len(shape) < 1 or shape[0] < 1:
        raise KineFlowError(f"noise shape needs a batch dimension >= 1, got {tuple(shape)}")
    return draw_noise(shape, entry_generators(seed, shape[0]), dtype=dtype, device=device)
