"""Helpers shared by the tests of the shipped tiny models (test_shipped_model.py, test_shipped_animatediff.py)."""

import json
from pathlib import Path

import av
import torch

from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.shapes.judge import judge, score
from kineflow.shapes.prompts import parse_prompt

# The sections of a model card, in order (training/train.py and train_animatediff.py write them).
CARD_SECTIONS = ["## Intended use", "## Vocabulary", "## Recommended settings", "## Limitations", "## Evaluation",
                 "## Training data", "## Training"]


def run_to_mp4(workflow: Path, models_dir: Path, output_dir: Path) -> torch.Tensor:
    """Run a shipped workflow; check it saved an mp4 of the workflow's size with every decoded frame (node 7
    decodes, node 8 saves) and return those frames [F, H, W, 3]."""
    latent = next(node["inputs"] for node in json.loads(workflow.read_text()).values()
                  if node["class_type"] in ("KineFlowEmptyVideoLatent", "KineFlowImageToVideo"))
    width, height = latent["width"], latent["height"]
    results = run_workflow(str(workflow), models_dir=models_dir, output_dir=output_dir, cache=OutputCache())
    frames = results["7"]["outputs"][0]
    assert frames.shape[1:] == (height, width, 3)
    (saved,) = results["8"]["ui"]["images"]
    with av.open(str(output_dir / saved["subfolder"] / saved["filename"])) as container:
        stream = container.streams.video[0]
        assert (len(list(container.decode(stream))), stream.width, stream.height) == (len(frames), width, height)
    return frames


def obeys(frames: torch.Tensor, prompt: str) -> dict[str, float]:
    """The judge's per-attribute accuracy (0 or 1) of one video against what `prompt` asks for."""
    scores = score([judge(frames)], [parse_prompt(prompt)])
    return {name: s.accuracy for name, s in scores.items() if s.scored}
