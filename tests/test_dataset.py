"""Procedural dataset: determinism, geometry, train/held-out split, captions, speed, and the Shapes Video node."""

import re
import time

import numpy as np
import pytest
import torch

from kineflow.nodes.synthetic import KineFlowShapesVideo
from kineflow.errors import KineFlowError
from kineflow.shapes import dataset as D

HELDOUT_MARKERS = ("there is ", "a clip of ", "backdrop:", "; ", "the background is ")


def _specs(split, n, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return [D.sample_spec(rng, split, **kw) for _ in range(n)]


def test_dataset_is_deterministic_by_seed_and_index():
    a = D.ShapesVideoDataset(length=20, seed=3)
    b = D.ShapesVideoDataset(length=20, seed=3)
    c = D.ShapesVideoDataset(length=20, seed=4)
    for i in (0, 7, 19):
        va, ta, sa = a[i]
        vb, tb, sb = b[i]
        assert torch.equal(va, vb) and ta == tb and sa == sb
    assert [a.spec_and_caption(i) for i in range(20)] != [c.spec_and_caption(i) for i in range(20)]
    # Access order does not matter.
    assert a[5][1] == D.ShapesVideoDataset(length=20, seed=3)[5][1]
    with pytest.raises(IndexError):
        a[20]


def test_items_and_batches_have_trainer_layout():
    ds = D.ShapesVideoDataset(length=10, seed=1, frames=5, height=32, width=48)
    video, text, spec = ds[0]
    assert video.shape == (5, 32, 48, 3) and video.dtype == torch.float32
    assert 0.0 <= float(video.min()) and float(video.max()) <= 1.0
    assert isinstance(text, str) and text and spec.frames == 5
    batches = list(ds.batches(4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert sorted(t for b in batches for t in b[1]) == sorted(ds.spec_and_caption(i)[1] for i in range(10))
    videos, texts, specs = ds.batch([2, 3])
    assert torch.equal(videos[1], ds[3][0]) and texts[0] == ds[2][1] and specs[1] == ds[3][2]


def test_frame_count_must_be_one_plus_four_k():
    for bad in (0, 2, 8, 10):
        with pytest.raises(KineFlowError, match="1 \\+ 4k"):
            D.ShapesVideoDataset(frames=bad)
    assert D.render(_specs("train", 1, frames=13)[0]).shape[0] == 13
    # clips of other lengths (AnimateDiff's 16) are the start of the shortest renderable clip holding them
    assert [D.frames_to_render(n) for n in (1, 2, 9, 12, 16, 17)] == [1, 5, 9, 13, 17, 17]


def test_shapes_stay_in_frame_and_apart():
    for spec in _specs("train", 400, seed=2, two_shape_prob=0.5) + _specs("train", 50, seed=3, height=40, width=96):
        for shape in spec.shapes:
            assert D.fits_in_frame(shape, spec.frames, spec.height, spec.width)
            travel_range = D.TRAVEL_RANGE if len(spec.shapes) == 1 else D.TWO_SHAPE_TRAVEL_RANGE
            if shape.direction != "still":
                assert shape.travel >= travel_range[0] * 0.999
        if len(spec.shapes) == 2:
            assert D.shapes_apart(*spec.shapes, spec.frames, spec.height, spec.width)
            assert all(s.scale_change == "none" for s in spec.shapes)
            first, second = (D._boxes(s, spec.frames, spec.height, spec.width) for s in spec.shapes)
            assert first[:, 1].max() <= spec.width / 2 and second[:, 0].min() >= spec.width / 2
        clip = D.render(spec)
        border = np.concatenate([clip[:, [0, -1]].reshape(-1, 3), clip[:, :, [0, -1]].reshape(-1, 3)])
        assert (border == np.array(D.COLOURS[spec.background], dtype=np.uint8)).all()


def test_trajectories_are_centred_so_the_caption_fixes_where_a_shape_goes():
    """A shape moving left starts right of its region's centre and ends left of it, whatever the seed."""
    for spec in _specs("train", 300, seed=4, two_shape_prob=0.5):
        for i, shape in enumerate(spec.shapes):
            cx, cy, _ = D._trajectory(shape, spec.frames, spec.height, spec.width)
            region_mid = 0.5 if len(spec.shapes) == 1 else (0.25, 0.75)[i]
            slack = D.CENTRE_JITTER + shape.size * 2 / 3  # the triangle's centroid sits off its box centre
            assert abs((cx[0] + cx[-1]) / 2 / spec.width - region_mid) <= slack + 1e-6
            assert abs((cy[0] + cy[-1]) / 2 / spec.height - 0.5) <= slack + 1e-6
            ux, uy = D.DIRECTIONS[shape.direction]
            if ux:
                assert np.sign(cx[0] - region_mid * spec.width) == -np.sign(ux)


def test_render_draws_the_spec():
    shape = D.ShapeSpec("square", "red", x=0.3, y=0.5, size=0.1, direction="right", travel=0.4, scale_change="grows")
    clip = D.render(D.ClipSpec("blue", (shape,), frames=9, height=64, width=64))
    red = (clip == np.array(D.COLOURS["red"], dtype=np.uint8)).all(-1)
    first, last = red[0], red[-1]
    assert first[32, int(0.3 * 64)] and last[32, int(0.7 * 64)]
    assert last.sum() / first.sum() == pytest.approx(D.GROWTH_FACTOR**2, rel=0.15)
    cols_first, cols_last = np.nonzero(first.any(0))[0], np.nonzero(last.any(0))[0]
    assert cols_last.mean() > cols_first.mean() + 20


def test_heldout_combinations_never_appear_in_training():
    assert 0.10 < len(D.combos("heldout")) / (len(D.combos("train")) + len(D.combos("heldout"))) < 0.20
    train_combos = set(D.combos("train"))
    # Every single attribute value is still seen in training.
    for position, values in enumerate((D.COLOURS, D.SHAPES, D.DIRECTIONS, D.COLOURS)):
        assert {c[position] for c in train_combos} == set(values)
    for spec in _specs("train", 3000, seed=5, two_shape_prob=0.5):
        assert D.spec_split(spec) == "train"
        for s in spec.shapes:
            assert (s.colour, s.kind, s.direction, spec.background) in train_combos
    for spec in _specs("heldout", 500, seed=6):
        first = spec.shapes[0]
        assert D.combo_is_heldout(first.colour, first.kind, first.direction, spec.background)


def test_caption_templates_and_synonym_coverage():
    rng = np.random.default_rng(7)
    specs = _specs("train", 3000, seed=8)
    train_caps = [D.caption(s, rng, "train") for s in specs]
    held_caps = [D.caption(s, rng, "heldout") for s in specs[:400]]
    text = " | ".join(train_caps)
    for words in list(D.SHAPE_WORDS.values()) + list(D.DIRECTION_WORDS.values()):
        for w in words:
            assert f" {w} " in text or f" {w}," in text or f" {w}." in text, w
    for phrase in D.STILL_VERB + D.STILL_PARTICIPLE + D.GROW_VERB + D.SHRINK_VERB:
        assert phrase in text, phrase
    assert len(set(train_caps)) > 2500
    # Held-out sentence templates never occur in training captions, and held-out captions always use them.
    assert not any(c.startswith(HELDOUT_MARKERS[:2]) or any(m in c for m in HELDOUT_MARKERS[2:4]) for c in train_caps)
    assert not any(c.startswith("the background is") for c in train_caps)
    assert all(c.startswith(HELDOUT_MARKERS) or any(m in c for m in HELDOUT_MARKERS[2:4]) for c in held_caps)
    with pytest.raises(KineFlowError, match="templates"):
        D.caption(specs[0], rng, "other")


def test_extra_training_templates_read_back_and_keep_clear_of_the_heldout_wording():
    """The "extended" pool (training + extra templates) describes the same scene in more sentence shapes: every
    caption parses back to its spec, every extra template is used, and none borrows a held-out template's
    wording, so held-out prompts still measure phrasings the models never saw."""
    from kineflow.shapes.prompts import expected_from_spec, parse_prompt

    rng = np.random.default_rng(9)
    specs = _specs("train", 1500, seed=10, two_shape_prob=0.4)
    captions = [D.caption(s, rng, "extended") for s in specs]
    for spec, text in zip(specs, captions):
        assert parse_prompt(text) == expected_from_spec(spec), text
    for table in (D.SINGLE_TEMPLATES, D.TWO_TEMPLATES):
        assert not set(table["extra"]) & set(table["train"] + table["heldout"])
        for template in table["extra"]:
            pattern = re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)) + "$")
            assert any(pattern.match(c) for c in captions), template
    assert not any(c.startswith(HELDOUT_MARKERS) or any(m in c for m in HELDOUT_MARKERS[2:4]) for c in captions)
    assert not any(m in c for c in captions for m in ("in front of", "plain ", " that "))


def test_invalid_specs_are_rejected_with_clear_messages():
    circle = D.ShapeSpec("circle", "red", 0.5, 0.5, 0.1)
    with pytest.raises(KineFlowError, match="differ"):
        D.ClipSpec("red", (circle,))
    with pytest.raises(KineFlowError, match="unknown shape 'hexagon'"):
        D.ShapeSpec("hexagon", "red", 0.5, 0.5, 0.1)
    with pytest.raises(KineFlowError, match="one or two shapes"):
        D.ClipSpec("blue", ())


def test_render_speed():
    specs = _specs("train", 500, seed=9)
    start = time.perf_counter()
    for spec in specs:
        D.render(spec)
    elapsed = time.perf_counter() - start
    print(f"rendered 500 clips of 9x64x64 in {elapsed:.2f} s")
    assert elapsed < 20.0  # ~0.6 s on an idle 2-core CPU; generous for a loaded machine


def test_shapes_video_node():
    node = KineFlowShapesVideo()
    (images,) = node.render("triangle", "yellow", "black", "up-left", "shrinks", 5, 48, 32, 11)
    assert images.shape == (5, 32, 48, 3) and images.dtype == torch.float32
    (again,) = node.render("triangle", "yellow", "black", "up-left", "shrinks", 5, 48, 32, 11)
    assert torch.equal(images, again)
    assert "must differ" in KineFlowShapesVideo.VALIDATE_INPUTS(colour="red", background="red", frames=9)
    assert "1 + 4k" in KineFlowShapesVideo.VALIDATE_INPUTS(colour="red", background="blue", frames=8)
    assert KineFlowShapesVideo.VALIDATE_INPUTS(colour="red", background="blue", frames=9) is True
    for name, (kind, options) in KineFlowShapesVideo.INPUT_TYPES()["required"].items():
        assert options.get("tooltip"), name
        if kind == "INT":
            assert {"default", "min", "max", "step"} <= set(options), name
