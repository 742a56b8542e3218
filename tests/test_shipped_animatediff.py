"""The shipped tiny AnimateDiff-family model (weights/checkpoints, weights/animatediff_models): its workflow,
what it gets right, seeds, and its files read like released ones.

Only the shipped weights are visible (an empty models folder), so these runs are what a fresh clone gets. Every
run is seeded, so the checks are deterministic. Direction and temporal consistency are not asserted: the shipped
motion module does not yet move shapes as the prompt says, nor make frames measurably more alike than the image
model alone (README, "The shipped tiny AnimateDiff model").
"""

import json
from pathlib import Path

import av
import pytest
import torch

import kineflow
from kineflow.runtime import host
from kineflow.runtime.cli import main as cli_main
from kineflow.runtime.evaluation import (ANIMATEDIFF_CHECKPOINT, ANIMATEDIFF_MOTION_MODULE, EvalSettings, generate_clip,
                                         load_animatediff)
from kineflow.runtime.executor import OutputCache, run_workflow
from kineflow.training.judge import judge, score
from kineflow.training.prompts import parse_prompt

PACK = Path(kineflow.__file__).resolve().parent
WORKFLOW = PACK / "workflows" / "api" / "animatediff_tiny.json"
WEIGHTS = PACK / "weights"
NODES = json.loads(WORKFLOW.read_text())
SAMPLER = NODES["6"]["inputs"]
SETTINGS = EvalSettings(steps=SAMPLER["steps"], cfg=SAMPLER["cfg"], shift=SAMPLER["shift"],
                        sampler_name=SAMPLER["sampler_name"], frames=NODES["5"]["inputs"]["frames"])

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no_models")
    with host.configured(models_dir=empty):
        yield empty


@pytest.fixture(scope="module")
def animated(models_dir):
    return load_animatediff()


def _obeys(frames: torch.Tensor, prompt: str) -> dict[str, float]:
    scores = score([judge(frames)], [parse_prompt(prompt)])
    return {name: s.accuracy for name, s in scores.items() if s.scored}


def test_workflow_writes_a_16_frame_mp4_in_the_prompted_colours(models_dir, tmp_path):
    results = run_workflow(str(WORKFLOW), models_dir=models_dir, output_dir=tmp_path, cache=OutputCache())
    frames = results["7"]["outputs"][0]
    assert frames.shape == (16, 64, 64, 3)
    (saved,) = results["8"]["ui"]["images"]
    with av.open(str(tmp_path / saved["subfolder"] / saved["filename"])) as container:
        stream = container.streams.video[0]
        assert (len(list(container.decode(stream))), stream.width, stream.height) == (16, 64, 64)
    accuracy = _obeys(frames, NODES["4"]["inputs"]["prompt"])
    assert (accuracy["colour"], accuracy["background"]) == (1.0, 1.0), judge(frames)


def test_same_seed_same_frames_other_seeds_other_videos_in_the_same_colours(animated):
    prompt = "a yellow square moves down on a black background"
    first, again = generate_clip(animated, prompt, SETTINGS, seed=3), generate_clip(animated, prompt, SETTINGS, seed=3)
    assert torch.equal(first, again)
    for seed in (4, 5):
        video = generate_clip(animated, prompt, SETTINGS, seed=seed)
        assert ((video - first).abs().amax(dim=-1) > 0.1).float().mean() > 0.01
        accuracy = _obeys(video, prompt)
        assert (accuracy["colour"], accuracy["background"]) == (1.0, 1.0), judge(video)


def test_shipped_files_inspect_like_released_ones_and_fit_the_budget(capsys):
    checkpoint = WEIGHTS / "checkpoints" / ANIMATEDIFF_CHECKPOINT
    module = WEIGHTS / "animatediff_models" / ANIMATEDIFF_MOTION_MODULE
    families = {}
    for path in (checkpoint, module):
        assert cli_main(["inspect", str(path), "--json"]) == 0
        families[path.name] = json.loads(capsys.readouterr().out)["family"]
    assert families == {checkpoint.name: "sd15_checkpoint", module.name: "animatediff_motion_module"}
    assert checkpoint.stat().st_size + module.stat().st_size <= 25 * 2**20
    assert (WEIGHTS / "MODEL_CARD_ANIMATEDIFF.md").is_file()
