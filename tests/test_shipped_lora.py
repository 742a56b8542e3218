"""The shipped tiny LoRA (weights/loras/kineflow_tiny_quickly_lora.safetensors, training/train_lora.py): the workflow a
fresh clone runs with it, and the speed word it teaches the shipped transformer on held-out prompts.

Only the shipped weights are visible (an empty --models-dir). Every run is seeded, so the figures are
deterministic; the floors sit a margin below those measured (README, "Training a LoRA")."""

import json
import logging
from pathlib import Path

import pytest

import kineflow
from kineflow.runtime.evaluation import evaluate, load_hunyuan_video, shipped_workflow_settings
from kineflow.shapes.judge import FAST_TRAVEL, judge
from kineflow.shapes.shipped import QUICKLY_LORA
from shipped_checks import obeys, run_to_mp4

PACK = Path(kineflow.__file__).resolve().parent
WORKFLOW = PACK / "workflows" / "api" / "lora_quickly.json"

pytestmark = pytest.mark.usefixtures("one_thread")


def _travel(frames) -> float:
    (shape,) = judge(frames).objects
    return shape.travel


def test_lora_workflow_moves_the_shape_quickly_where_the_base_model_does_not(shipped_only_models_dir, tmp_path,
                                                                               caplog):
    nodes = json.loads(WORKFLOW.read_text())
    assert nodes["9"]["inputs"]["lora_name"] == QUICKLY_LORA
    prompt = nodes["4"]["inputs"]["prompt"]
    assert "quickly" in prompt.split()
    with caplog.at_level(logging.WARNING):
        frames = run_to_mp4(WORKFLOW, shipped_only_models_dir, tmp_path / "lora")
    # the LoRA names the word it taught, so the shipped model's prompt check no longer calls it unknown
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]
    accuracy = obeys(frames, prompt)
    assert (accuracy["colour"], accuracy["shape"], accuracy["direction"]) == (1.0, 1.0, 1.0), prompt
    assert _travel(frames) > FAST_TRAVEL

    nodes["9"]["inputs"]["strength"] = 0.0  # the same workflow without the LoRA: the word means nothing
    without = tmp_path / "without.json"
    without.write_text(json.dumps(nodes))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        base_frames = run_to_mp4(without, shipped_only_models_dir, tmp_path / "base")
    assert [r for r in caplog.records if "does not know: 'quickly'" in r.getMessage()]  # no LoRA, no new word
    assert _travel(base_frames) < FAST_TRAVEL < _travel(frames)


def test_lora_teaches_quickly_on_held_out_prompts(shipped_only_models_dir):
    report = evaluate(load_hunyuan_video(loras=[(QUICKLY_LORA, 1.0)]), heldout=12,
                      settings=shipped_workflow_settings("hunyuan_video"), concept="quickly")
    adherence = report["concept_adherence"]
    # measured on this slice (12 held-out concept prompts): 11 of 12 moved quickly; the base model moves none of
    # them quickly. The floor leaves one
    assert adherence["correct"] >= 10, report
