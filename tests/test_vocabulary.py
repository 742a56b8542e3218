"""The shipped tiny models' vocabulary: synonyms rewritten into caption words, unknown words named in a warning,
and both only for the shipped models; the shipped workflows' prompts and every caption stay as they are."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kineflow
from kineflow.nodes.generation import KineFlowTextEncode
from kineflow.runtime import host
from kineflow.runtime.animatediff import load_sd_checkpoint
from kineflow.runtime.evaluation import SHIPPED_WORKFLOWS
from kineflow.runtime.video_models import load_text_encoders
from kineflow.shapes import dataset
from kineflow.shapes.prompts import ObjectAttributes, parse_prompt
from kineflow.shapes.shipped import ANIMATEDIFF_CHECKPOINT, HUNYUAN_VIDEO, TEXT_ENCODER_TEMPLATES
from kineflow.shapes.vocabulary import SYNONYMS, Vocabulary, text_encoder_vocabulary, words
from kineflow.training.common import vocabulary_section, workflow_settings_line
from kineflow.training.tiny_models import write_models
from shipped_checks import CARD_SECTIONS

PACK = Path(kineflow.__file__).resolve().parent
HUNYUAN_VOCABULARY = text_encoder_vocabulary(HUNYUAN_VIDEO["llm"])
ANIMATEDIFF_VOCABULARY = text_encoder_vocabulary(ANIMATEDIFF_CHECKPOINT)
UNKNOWN_PROMPT = "a purple star moves left on an orange background"


def _shipped_workflow_prompts() -> list[str]:
    """The prompts of the workflows that run the shipped tiny models."""
    prompts = []
    for name in SHIPPED_WORKFLOWS.values():
        for node in json.loads((PACK / "workflows" / "api" / name).read_text()).values():
            if node["class_type"] == "KineFlowTextEncode":
                prompts += [node["inputs"]["prompt"], node["inputs"]["negative_prompt"]]
    return prompts


@pytest.mark.parametrize("vocabulary", [HUNYUAN_VOCABULARY, ANIMATEDIFF_VOCABULARY], ids=["hunyuan", "animatediff"])
def test_workflow_prompts_and_captions_read_unchanged(vocabulary):
    """What the shipped models were made with, and what their workflows and the README ask, is never rewritten:
    the shipped workflows' outputs and the measured held-out scores stay as they are."""
    rng = np.random.default_rng(0)
    templates = ("any", "extended") if vocabulary is ANIMATEDIFF_VOCABULARY else ("any",)
    specs = [dataset.sample_spec(rng, split, two_shape_prob=0.5) for split in ("train", "heldout") for _ in range(150)]
    captions = [dataset.caption(spec, rng, name) for spec in specs for name in templates]
    readme_example = "a yellow square moves down on a black background"
    for prompt in [*_shipped_workflow_prompts(), readme_example, *captions]:
        assert vocabulary.normalize(prompt) == (prompt, []), prompt
        assert vocabulary.unknown_words(prompt) == [], prompt


def test_hunyuan_vocabulary_is_what_its_tokenizer_knows():
    """No word the warnings call known is `[UNK]` to the shipped word-level tokenizer."""
    tokenizer = json.loads((PACK / "weights" / "text_encoders" / HUNYUAN_VIDEO["llm"] / "tokenizer.json").read_text())
    assert HUNYUAN_VOCABULARY.words <= set(tokenizer["model"]["vocab"])
    assert HUNYUAN_VOCABULARY.words < ANIMATEDIFF_VOCABULARY.words  # the AnimateDiff CLIP also read more phrasings


def test_synonyms_are_unknown_words_mapped_to_training_caption_words():
    training_words = Vocabulary.of_captions(("train",)).words
    every_caption_word = Vocabulary.of_captions().words
    for word, phrase in SYNONYMS.items():
        assert word not in every_caption_word, word
        assert set(words(phrase)) <= training_words, (word, phrase)


def test_normalize_rewrites_synonyms_and_names_what_is_left():
    prompt = "A grey Ball rises, then sinks towards an aqua backdrop"
    normalized, replaced = HUNYUAN_VOCABULARY.normalize(prompt)
    assert normalized == "A grey Ball moves up, then moves down toward an cyan backdrop"
    assert replaced == [("rises", "moves up"), ("sinks", "moves down"), ("towards", "toward"), ("aqua", "cyan")]
    # grey has no palette colour that matches it, and "then" is no caption word: both stay, named as unknown
    assert HUNYUAN_VOCABULARY.unknown_words(normalized) == ["grey", "then"]
    assert HUNYUAN_VOCABULARY.unknown_words(UNKNOWN_PROMPT) == ["purple", "star", "orange"]


def test_the_judge_reads_synonyms_as_the_models_do():
    parsed = parse_prompt("a white cube descends diagonally down-left, aqua backdrop")
    assert parsed.background == "cyan"
    assert parsed.objects == (ObjectAttributes("white", "square", "down-left"),)


@pytest.fixture(scope="module")
def shipped_text_encoder(shipped_only_models_dir):
    return load_text_encoders(HUNYUAN_VIDEO["llm"], HUNYUAN_VIDEO["clip"])


def test_text_encode_node_warns_about_unknown_words_of_a_shipped_model(shipped_text_encoder, caplog):
    with caplog.at_level(logging.INFO, logger="kineflow"):
        KineFlowTextEncode().encode(shipped_text_encoder, UNKNOWN_PROMPT, "")
    (warning,) = [r for r in caplog.records if r.name.startswith("kineflow") and r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "'purple', 'star', 'orange'" in message
    assert "red, green, blue, yellow, cyan, magenta, white, black" in message and "circle" in message


def test_text_encode_node_reads_synonyms_as_the_words_they_mean(shipped_text_encoder, caplog):
    plain = "a red circle moves up on a blue background"
    with caplog.at_level(logging.INFO, logger="kineflow"):
        (synonym,) = KineFlowTextEncode().encode(shipped_text_encoder, "a red sphere rises on a blue background", "")
    (canonical,) = KineFlowTextEncode().encode(shipped_text_encoder, plain, "")
    for key, value in canonical["positive"].items():
        assert torch.equal(synonym["positive"][key], value), key
    (note,) = [r for r in caplog.records if r.name.startswith("kineflow")]
    assert note.levelno == logging.INFO and "'rises' -> 'moves up'" in note.getMessage()


def test_only_shipped_text_encoders_get_the_shapes_vocabulary(shipped_only_models_dir, tmp_path, caplog):
    assert load_sd_checkpoint(ANIMATEDIFF_CHECKPOINT)[2].vocabulary == ANIMATEDIFF_VOCABULARY
    # A user's models, even under the shipped names (tiny random models in another folder): prompts untouched.
    write_models(tmp_path, texts=[UNKNOWN_PROMPT, "a red sphere rises"], seed=0, names=HUNYUAN_VIDEO)
    with host.configured(models_dir=tmp_path):
        users = load_text_encoders(HUNYUAN_VIDEO["llm"], HUNYUAN_VIDEO["clip"])
    assert users.vocabulary is None
    with caplog.at_level(logging.INFO, logger="kineflow"):
        KineFlowTextEncode().encode(users, UNKNOWN_PROMPT, "a red sphere rises")
    assert [r for r in caplog.records if r.name.startswith("kineflow")] == []


def test_kineflow_run_prints_the_warning(tmp_path):
    """The real command, outside pytest's log capture: the warning is a line on stderr (a dry run is enough, the
    prompt is checked before encoding)."""
    env = {**os.environ, "KINEFLOW_MODELS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "kineflow.runtime.cli", "run", str(PACK / "workflows" / "api" / "text_to_video.json"),
         "--device", "meta", "--output-dir", str(tmp_path), "--set", f"4.prompt={UNKNOWN_PROMPT}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "words the shipped tiny model does not know: 'purple', 'star', 'orange'" in done.stderr


@pytest.mark.parametrize("card, family, text_encoder", [
    ("MODEL_CARD.md", "hunyuan_video", HUNYUAN_VIDEO["llm"]),
    ("MODEL_CARD_ANIMATEDIFF.md", "animatediff", ANIMATEDIFF_CHECKPOINT),
])
def test_model_cards_list_the_vocabulary_and_recommend_the_workflows_settings(card, family, text_encoder):
    text = (PACK / "weights" / card).read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == CARD_SECTIONS
    assert vocabulary_section(TEXT_ENCODER_TEMPLATES[text_encoder]) in text  # the words the warnings check against
    assert workflow_settings_line(family) in text


def test_readme_lists_the_vocabulary():
    readme = (PACK / "README.md").read_text()
    section = readme[readme.index("### What the shipped models understand"):
                     readme.index("### The shipped tiny text-to-video model")]
    shape_words = [word for options in dataset.SHAPE_WORDS.values() for word in options]
    for word in [*dataset.COLOURS, *shape_words, "left", "right", "up", "down", "still", "grows", "shrinks"]:
        assert word in section, word
