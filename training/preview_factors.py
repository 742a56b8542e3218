"""Fit the latent -> RGB preview factors of an SD1.5 checkpoint's VAE and write them into the file's metadata.

    python -m kineflow.training.preview_factors weights/checkpoints/kineflow_tiny_sd15.safetensors

The Sampler's live preview (runtime/previews.py) maps latents to RGB linearly. A checkpoint without factors of its
own is previewed with the released SD1.5 VAE's, which do not fit a VAE KineFlow trained. This writes the fitted
ones (metadata `kineflow.latent_rgb_factors`, as `train_animatediff export` does) and leaves every tensor byte as
it was. The fit uses the frames of the shapes dataset the VAE trained on: the seed and clip count in the
checkpoint's training record (`kineflow.training`), else the `vae` stage's defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import KineFlowError
from ..runtime import host
from ..runtime.animatediff import load_sd_checkpoint_vae
from ..runtime.previews import FACTORS_METADATA_KEY
from .common import set_threads
from .tiny_models import set_metadata
from .train_animatediff import VAESettings, _training_record, preview_factors_metadata


def write_preview_factors(path: Path) -> str:
    """Fit the factors of the checkpoint at `path` and store them in its metadata; returns the stored entry."""
    path = Path(path).resolve()
    if path.suffix != ".safetensors":
        raise KineFlowError(f"{path.name}: expected a .safetensors checkpoint (its metadata holds the factors)")
    with host.configured(device="cpu"):
        vae = load_sd_checkpoint_vae(str(path), dtype_name="fp32").vae
    trained = _training_record(path).get("vae", {})
    defaults = VAESettings()
    entry = preview_factors_metadata(vae, trained.get("seed", defaults.seed), trained.get("clips", defaults.clips))
    set_metadata(path, {FACTORS_METADATA_KEY: entry})
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kineflow.training.preview_factors",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an SD1.5 checkpoint (.safetensors) whose VAE KineFlow trained")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    try:
        entry = write_preview_factors(Path(args.checkpoint))
    except KineFlowError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"{args.checkpoint}: {FACTORS_METADATA_KEY} = {entry}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
