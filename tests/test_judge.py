"""Analytic judge and prompt parsing: accuracy on generator clips (clean and VAE-like degraded), scoring rules."""

import numpy as np
import pytest
import torch

from kineflow.errors import KineFlowError
from kineflow.shapes import dataset as D
from kineflow.shapes import judge as J
from kineflow.shapes import prompts as P


def _blur(clip: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over H and W of a float [F, H, W, 3] clip (edge padding)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = clip.shape[1:3]
    p = np.pad(clip, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    p = sum(k[i] * p[:, i : i + h] for i in range(2 * r + 1))
    return sum(k[i] * p[:, :, i : i + w] for i in range(2 * r + 1))


def _judge_many(split, n, seed, degrade):
    rng = np.random.default_rng(seed)
    specs, verdicts = [], []
    for _ in range(n):
        spec = D.sample_spec(rng, split, two_shape_prob=0.3)
        clip = D.render(spec)
        if degrade:  # roughly what a tiny VAE does: soft edges, noise, a slight loss of saturation
            x = _blur(clip.astype(np.float32) / 255.0, 1.0)
            x = 0.95 * x + 0.05 * x.mean(-1, keepdims=True) + rng.normal(0.0, 0.03, x.shape)
            clip = np.clip(x, 0.0, 1.0)
        specs.append(spec)
        verdicts.append(J.judge(clip))
    return specs, verdicts


@pytest.mark.parametrize(
    "split,n,seed,degrade",
    [("train", 300, 0, False), ("heldout", 300, 1, False), ("train", 120, 2, True), ("heldout", 120, 3, True)],
)
def test_judge_reads_generator_clips(split, n, seed, degrade):
    specs, verdicts = _judge_many(split, n, seed, degrade)
    scores = J.score(verdicts, [P.expected_from_spec(s) for s in specs])
    accuracy = {name: s.accuracy for name, s in scores.items()}
    print(split, "degraded" if degrade else "clean", accuracy)
    assert all(a >= 0.99 for a in accuracy.values()), accuracy
    assert sum(len(s.shapes) == 2 for s in specs) > n // 5
    # No spurious objects (e.g. from anti-aliased edges mixing two colours).
    assert sum(len(v.objects) == len(s.shapes) for s, v in zip(specs, verdicts)) >= 0.99 * n
    assert np.mean([v.temporal_consistency for v in verdicts]) > 0.85


def test_judge_measures_motion_and_size():
    shape = D.ShapeSpec("circle", "white", 0.3, 0.7, size=0.1, direction="up-right", travel=0.4, scale_change="grows")
    v = J.judge(D.render(D.ClipSpec("black", (shape,))))
    obj = v.primary
    read = (v.background, obj.colour, obj.shape, obj.direction, obj.scale_change)
    assert read == ("black", "white", "circle", "up-right", "grows")
    assert obj.travel == pytest.approx(0.4, abs=0.02)
    assert obj.speed == pytest.approx(0.05, abs=0.003)
    assert obj.area_ratio == pytest.approx(D.GROWTH_FACTOR**2, rel=0.1)
    assert obj.presence == 1.0


def test_judge_input_forms_and_empty_clip():
    spec = D.sample_spec(np.random.default_rng(4), "train", two_shape_prob=0.0)
    clip = D.render(spec)
    as_uint8, as_float = J.judge(clip), J.judge(torch.from_numpy(clip).float() / 255.0)
    assert as_uint8.objects[0].shape == as_float.objects[0].shape and as_uint8.colour == as_float.colour
    empty = J.judge(np.full((5, 32, 32, 3), 0.5, dtype=np.float32))
    assert empty.objects == () and empty.colour == "none" and empty.temporal_consistency == 0.0
    with pytest.raises(KineFlowError, match=r"\[frames, H, W, 3\]"):
        J.judge(np.zeros((5, 32, 32)))


def test_temporal_consistency_drops_when_the_shape_changes_or_vanishes():
    frames = []
    for i in range(9):
        kind = "circle" if i % 2 == 0 else "triangle"
        frames.append(D.render(D.ClipSpec("blue", (D.ShapeSpec(kind, "yellow", 0.5, 0.5, 0.2),), frames=1))[0])
    flicker = J.judge(np.stack(frames)).primary.temporal_consistency
    steady = J.judge(np.stack([frames[0]] * 9)).primary.temporal_consistency
    vanishing = np.stack([frames[0]] * 4 + [np.full_like(frames[0], D.COLOURS["blue"])] * 5)
    assert steady == pytest.approx(1.0)
    assert flicker < 0.75
    assert J.judge(vanishing).primary.temporal_consistency == pytest.approx(3 / 8)


def test_parse_prompt_round_trips_every_caption_template():
    rng = np.random.default_rng(5)
    for i in range(1500):
        spec = D.sample_spec(rng, "train" if i % 2 else "heldout", two_shape_prob=0.3)
        text = D.caption(spec, rng, "any")
        parsed = P.parse_prompt(text)
        assert parsed == P.expected_from_spec(spec), text
        assert parsed.unknown_words == (), text


def test_parse_prompt_on_user_paraphrases():
    p = P.parse_prompt("A green box sliding toward the upper right, black backdrop")
    assert p.background == "black" and p.objects == (P.ObjectAttributes("green", "square", "up-right", "none"),)
    p = P.parse_prompt("Moving down-left, a Cyan disk that keeps getting smaller over a white background.")
    assert p.background == "white" and p.objects == (P.ObjectAttributes("cyan", "circle", "down-left", "shrinks"),)
    p = P.parse_prompt("the background is red; a blue ball stays still and a yellow triangle goes up")
    assert p.objects == (P.ObjectAttributes("blue", "circle", "still"), P.ObjectAttributes("yellow", "triangle", "up"))
    p = P.parse_prompt("A crimson ball rolls left over a grey backdrop")
    assert p.background == P.UNKNOWN and p.objects == (P.ObjectAttributes(P.UNKNOWN, "circle", "left"),)
    assert p.unknown_words == ("crimson",)  # "rolls" is a synonym of "moves" (shapes/vocabulary.py)
    assert P.parse_prompt("something pretty").objects == ()


def test_heldout_prompts_are_heldout_and_deterministic():
    prompts = P.heldout_prompts(40, seed=3)
    assert prompts == P.heldout_prompts(40, seed=3) and prompts != P.heldout_prompts(40, seed=4)
    for text, spec in prompts:
        first = spec.shapes[0]
        assert D.combo_is_heldout(first.colour, first.kind, first.direction, spec.background)
        assert P.parse_prompt(text) == P.expected_from_spec(spec)


def test_score_rules():
    red = J.ObjectVerdict("red", (0.9, 0.1, 0.1), "circle", 0.78, "left", 0.3, 0.04, "none", 1.0, 0.05, 1.0, 0.9)
    blue = J.ObjectVerdict("blue", (0.1, 0.1, 0.9), "square", 1.0, "up", 0.3, 0.04, "none", 1.0, 0.03, 1.0, 0.9)
    verdict = J.Verdict("white", (0.9, 0.9, 0.9), (red, blue))
    # One-shape prompt: compared with the largest object only.
    s = J.score([verdict], [P.parse_prompt("a blue square moves up on a white background")])
    assert (s["colour"].correct, s["shape"].correct, s["direction"].correct, s["background"].correct) == (0, 0, 0, 1)
    # Two-shape prompt: matched by colour, order does not matter; a missing colour makes that object wrong.
    s = J.score([verdict], [P.parse_prompt("a blue square moves up and a red ball moves left on a white background")])
    assert s["colour"].accuracy == s["shape"].accuracy == s["direction"].accuracy == 1.0
    s = J.score([verdict], [P.parse_prompt("a green square moves up and a red ball moves left on a white background")])
    assert (s["colour"].correct, s["colour"].scored, s["shape"].correct) == (1, 2, 1)
    # Unknown attributes are skipped, not counted.
    s = J.score([verdict], [P.parse_prompt("a ball moves left")])
    assert (s["colour"].skipped, s["background"].skipped) == (1, 1)
    assert (s["colour"].accuracy, s["shape"].accuracy) == (None, 1.0)
    with pytest.raises(KineFlowError, match="one verdict per prompt"):
        J.score([verdict], [])
