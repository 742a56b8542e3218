"""Peak memory of an untiled vs a tiled HunyuanVideo VAE decode on the CPU.

Each decode runs in a fresh subprocess. The process builds the model and its input, runs a small warm-up
decode (a 4x4 latent, so one-off kernel set-up is in the baseline), then records ru_maxrss before and after
the measured decode; the difference is the decode's peak. The latent covers 4x the area of one spatial tile.
The children run with a fixed glibc mmap threshold (64 KiB) so that freed tensors go back to the system at
once; otherwise glibc's adaptive threshold keeps freed tile buffers in the heap and the figure measures the
allocator's caching rather than what the decode needs.

    python benchmarks/bench_vae_tiling.py            # prints both peaks and the tiled / untiled ratio
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# A mid-size config: the released block structure (4x time, 8x space) at a quarter of the widths.
WIDTHS = (32, 64, 128, 128)
LATENT_SHAPE = (1, 16, 3, 32, 32)  # 9 frames of 256x256
TILE = dict(tile_size=128, tile_overlap=32, tile_frames=16, frame_overlap=4)  # 128 px = 16 latents: 1/4 of the area
TARGET_RATIO = 0.40


def measure(mode: str) -> dict:
    import torch

    from kineflow.models.hunyuan_video_vae import (
        HunyuanVideoVAE,
        HunyuanVideoVAEConfig,
        TilingOptions,
        default_norm_groups,
        estimate_peak_bytes,
    )

    torch.manual_seed(0)
    config = HunyuanVideoVAEConfig(block_out_channels=WIDTHS, norm_num_groups=default_norm_groups(WIDTHS))
    vae = HunyuanVideoVAE(config).eval()
    latents = torch.randn(LATENT_SHAPE)
    tiling = TilingOptions(**TILE) if mode == "tiled" else None
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 2, 4, 4))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        video = vae.decode(latents, tiling=tiling)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, _, frames, height, width = video.shape
    tile_size = TILE["tile_size"] if tiling else max(height, width)
    estimate = estimate_peak_bytes(config, frames, min(tile_size, height), min(tile_size, width))
    return {
        "mode": mode,
        "peak_mib": (after - before) / 1024,  # ru_maxrss is in KiB on Linux
        "estimate_mib": estimate / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["untiled", "tiled"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return

    results = {}
    for mode in ("untiled", "tiled"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode:>8}: peak {r['peak_mib']:8.1f} MiB  (estimate {r['estimate_mib']:7.1f} MiB)  {r['seconds']:6.1f} s"
        )
    ratio = results["tiled"]["peak_mib"] / results["untiled"]["peak_mib"]
    print(f"latent {LATENT_SHAPE}, widths {WIDTHS}, tiles {TILE}")
    print(f"tiled / untiled peak = {ratio:.3f} (target <= {TARGET_RATIO}) -> {'OK' if ratio <= TARGET_RATIO else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
