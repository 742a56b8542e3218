"""Procedural video dataset: flat shapes moving over flat backgrounds, with plain-English captions.

Each clip is described by a `ClipSpec` (background colour + one or two `ShapeSpec`s) and rendered with
analytic anti-aliasing (pixel coverage from a signed distance, no supersampling), so thousands of clips render
in seconds. Geometry is stored resolution-independently: centres as fractions of width/height, sizes and
travel distances as fractions of the shorter image side. Paths are centred (see CENTRE_JITTER), so a caption
says where its shapes start and end, not only which way they go.

Train / held-out split: a stable hash of the attribute combination (colour, shape, direction, background)
puts about `HELDOUT_FRACTION` of all combinations in the held-out set. Training clips only use training
combinations (for every shape in the clip); held-out clips give their first shape a held-out combination.
Held-out captions may additionally use sentence templates that training never uses (the vocabulary itself is
shared, so a text encoder trained from scratch knows every word).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import KineFlowError
from .attributes import (CONCEPT_COLOURS, CONCEPTS, COLOURS, DIRECTIONS, GROWTH_FACTOR, SCALE_CHANGES, SHAPES,
                         SPEED_CONCEPTS)

# Every colour a shape may have: the palette and the concept colours (a background is always a palette colour).
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **CONCEPT_COLOURS}

HELDOUT_FRACTION = 0.15

# Bumped whenever the clips a (seed, index) pair renders change, so the trainers' latent caches rebuild.
# 2: trajectories centred in their region, larger shapes (2026-12-02).
# 3: narrower size, travel and centre ranges (2026-12-06), see below.
DATASET_VERSION = 3

# Ranges for sampled geometry (fractions of the shorter image side). A caption names neither size nor exact
# position, so whatever varies here is noise the model cannot predict from the text. With the wide ranges of
# version 2 that noise outweighed a shape's corners in the latent loss (a 2-pixel shift or a 15% size change
# moves the latent as much as a square turning into a circle; training/README.md, "Sixth run"). Version 3
# keeps a little variation, so that seeds still give different videos, and travels near the longest path
# that fits, so that direction is a large, clear displacement.
TRAVEL_RANGE = (0.34, 0.40)
# The travel of a speed concept's first shape ("quickly", shapes/attributes.py CONCEPTS): ~1.5x TRAVEL_RANGE, the
# longest that fits beside the shapes' sizes. A shape of SIZE_RANGES spans up to 0.42 of the side (0.21 x 2, or
# 0.13 x 1.6 x 2 when it grows), which at 128x128 leaves 0.557-0.66 of room along an axis (0.533 at 64x64, where
# place_shape then makes the largest shrinking shapes 0.8x smaller), so twice the normal travel (0.68-0.80) would
# not fit an axis direction without much smaller shapes. Speed concept clips have one shape: a shape kept in half
# the frame (TWO_SHAPE_TRAVEL_RANGE) has no room to travel faster. The judge's threshold between the two ranges is
# shapes/judge.py FAST_TRAVEL.
FAST_TRAVEL_RANGE = (0.54, 0.60)
SIZE_RANGES = {  # half-extent at the first frame, per scale change
    "none": (0.16, 0.18),
    "grows": (0.11, 0.13),
    "shrinks": (0.19, 0.21),
}
TWO_SHAPE_SIZE_RANGE = (0.11, 0.12)
TWO_SHAPE_TRAVEL_RANGE = (0.18, 0.20)
# Layout: a trajectory's midpoint sits at the centre of the shape's region (the frame, or for two-shape clips
# the left half for the first-named shape and the right half for the second), moved by at most this
# fraction of the shorter side. So where a shape goes follows from the caption alone: a tiny model learns
# motion as "start behind the centre, end ahead of it" instead of as a displacement relative to a random
# start, which it could not learn on this machine (training/README.md, "Fourth run").
CENTRE_JITTER = 0.02
EDGE_MARGIN_PX = 1.5  # keep every shape this far inside the frame on every frame
GAP_PX = 3.0  # minimum gap between the bounding boxes of two shapes on every frame


def validate_frames(frames: int) -> None:
    if frames < 1 or frames % 4 != 1:
        raise KineFlowError(
            f"frame count must be 1 + 4k (1, 5, 9, 13, ...) because the video VAE compresses time by 4; got {frames}"
        )


def frames_to_render(frames: int) -> int:
    """The fewest frames the dataset can render (1 + 4k) that hold `frames`; a clip of `frames` is their start."""
    return frames + (1 - frames) % 4


@dataclass(frozen=True)
class ShapeSpec:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS, or of CONCEPT_COLOURS in a concept clip
    x: float  # centre on the first frame, fraction of the width
    y: float  # centre on the first frame, fraction of the height
    size: float  # half-extent on the first frame, fraction of the shorter side
    direction: str = "still"  # one of DIRECTIONS
    travel: float = 0.0  # distance covered over the clip, fraction of the shorter side
    scale_change: str = "none"  # one of SCALE_CHANGES
    speed: str = ""  # "" (the normal travel), or a speed concept's name (FAST_TRAVEL_RANGE; its caption says so)

    def __post_init__(self):
        for value, allowed, what in (
            (self.kind, SHAPES, "shape"),
            (self.colour, SHAPE_COLOURS, "colour"),
            (self.direction, DIRECTIONS, "direction"),
            (self.scale_change, SCALE_CHANGES, "scale change"),
        ):
            if value not in allowed:
                raise KineFlowError(f"unknown {what} {value!r}; expected one of {list(allowed)}")
        if not self.size > 0:
            raise KineFlowError(f"shape size must be positive; got {self.size}")
        if self.speed and self.speed not in SPEED_CONCEPTS:
            raise KineFlowError(f"unknown speed {self.speed!r}; expected '' or one of {list(SPEED_CONCEPTS)}")


@dataclass(frozen=True)
class ClipSpec:
    background: str
    shapes: tuple[ShapeSpec, ...]
    frames: int = 9
    height: int = 64
    width: int = 64

    def __post_init__(self):
        if self.background not in COLOURS:
            raise KineFlowError(f"unknown background colour {self.background!r}; expected one of {list(COLOURS)}")
        validate_frames(self.frames)
        if self.height < 8 or self.width < 8:
            raise KineFlowError(f"clip size must be at least 8x8 pixels; got {self.width}x{self.height}")
        if not 1 <= len(self.shapes) <= 2:
            raise KineFlowError(f"a clip has one or two shapes; got {len(self.shapes)}")
        colours = [s.colour for s in self.shapes]
        if self.background in colours or len(set(colours)) != len(colours):
            raise KineFlowError(
                f"shape colours must differ from each other and from the background; "
                f"got shapes {colours} on {self.background!r}"
            )


# --------------------------------------------------------------------------- geometry
def _scale_factor(scale_change: str) -> float:
    return {"none": 1.0, "grows": GROWTH_FACTOR, "shrinks": 1.0 / GROWTH_FACTOR}[scale_change]


def _extents(kind: str, r: np.ndarray | float):
    """(left, right, up, down) distances from the shape's centre to its bounding box, in the units of r.

    The triangle (apex up) is placed by its centroid, which sits one third of the height above the base.
    """
    if kind == "triangle":
        return r, r, r * 4.0 / 3.0, r * 2.0 / 3.0
    return r, r, r, r


def _trajectory(shape: ShapeSpec, frames: int, height: int, width: int):
    """Per-frame centre (cx, cy) and half-extent r, all in pixels, shape [frames] each."""
    unit = min(height, width)
    t = np.arange(frames, dtype=np.float64) / max(frames - 1, 1)
    ux, uy = DIRECTIONS[shape.direction]
    cx = shape.x * width + ux * shape.travel * unit * t
    cy = shape.y * height + uy * shape.travel * unit * t
    r = shape.size * unit * _scale_factor(shape.scale_change) ** t
    return cx, cy, r


def _boxes(shape: ShapeSpec, frames: int, height: int, width: int) -> np.ndarray:
    """Per-frame bounding boxes [frames, 4] as (x0, x1, y0, y1) in pixels."""
    cx, cy, r = _trajectory(shape, frames, height, width)
    left, right, up, down = _extents(shape.kind, r)
    return np.stack([cx - left, cx + right, cy - up, cy + down], axis=1)


def fits_in_frame(shape: ShapeSpec, frames: int, height: int, width: int) -> bool:
    b = _boxes(shape, frames, height, width)
    m = EDGE_MARGIN_PX
    inside = (b[:, 0] >= m) & (b[:, 1] <= width - m) & (b[:, 2] >= m) & (b[:, 3] <= height - m)
    return bool(inside.all())


def shapes_apart(a: ShapeSpec, b: ShapeSpec, frames: int, height: int, width: int) -> bool:
    """True when the bounding boxes of the two shapes stay GAP_PX apart on every frame (no occlusion)."""
    ba, bb = _boxes(a, frames, height, width), _boxes(b, frames, height, width)
    apart_x = (ba[:, 1] + GAP_PX <= bb[:, 0]) | (bb[:, 1] + GAP_PX <= ba[:, 0])
    apart_y = (ba[:, 3] + GAP_PX <= bb[:, 2]) | (bb[:, 3] + GAP_PX <= ba[:, 2])
    return bool((apart_x | apart_y).all())


def place_shape(
    rng: np.random.Generator,
    kind: str,
    colour: str,
    direction: str,
    scale_change: str = "none",
    *,
    frames: int = 9,
    height: int = 64,
    width: int = 64,
    size_range: tuple[float, float] | None = None,
    travel_range: tuple[float, float] = TRAVEL_RANGE,
    region: tuple[float, float] = (0.0, 1.0),
) -> ShapeSpec:
    """Choose size, travel and start position so the shape stays fully inside `region` (a span of the width,
    as fractions) for the whole clip, its trajectory centred in the region (within CENTRE_JITTER)."""
    unit = min(height, width)
    left_px, width_px = region[0] * width, (region[1] - region[0]) * width
    lo, hi = size_range or SIZE_RANGES[scale_change]
    size = float(rng.uniform(lo, hi))
    travel = 0.0 if direction == "still" else float(rng.uniform(*travel_range))
    ux, uy = DIRECTIONS[direction]
    # In frames that leave too little room (e.g. very wide or tall ones) the shape is made smaller until at
    # least the minimum travel fits; beyond that the requested travel is shortened to the room available.
    for _ in range(20):
        r_max = size * unit * max(1.0, _scale_factor(scale_change))
        left, right, up, down = _extents(kind, r_max)
        room_x = width_px - 2 * EDGE_MARGIN_PX - left - right
        room_y = height - 2 * EDGE_MARGIN_PX - up - down
        room_along = min(room_x / abs(ux) if ux else math.inf, room_y / abs(uy) if uy else math.inf)
        travel_px = min(travel * unit, 0.999 * room_along)
        if room_x > 0 and room_y > 0 and (direction == "still" or room_along >= travel_range[0] * unit):
            break
        size *= 0.8
    else:
        raise KineFlowError(f"a moving {kind} does not fit in a {width}x{height} frame; use a larger frame")
    dx, dy = ux * travel_px, uy * travel_px
    x0_lo = left_px + EDGE_MARGIN_PX + left + max(0.0, -dx)
    x0_hi = left_px + width_px - EDGE_MARGIN_PX - right - max(0.0, dx)
    y0_lo = EDGE_MARGIN_PX + up + max(0.0, -dy)
    y0_hi = height - EDGE_MARGIN_PX - down - max(0.0, dy)
    jitter = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2) * unit
    # Centre the shape's box (not its centroid, which differs for the triangle) over the whole trajectory.
    box_mid_x = (right - left) / 2.0 + dx / 2.0
    box_mid_y = (down - up) / 2.0 + dy / 2.0
    inset = 1e-3  # keeps a clipped start strictly inside after the round trip through fractions
    cx = float(np.clip(left_px + width_px / 2.0 - box_mid_x + jitter[0], x0_lo + inset, x0_hi - inset))
    cy = float(np.clip(height / 2.0 - box_mid_y + jitter[1], y0_lo + inset, y0_hi - inset))
    return ShapeSpec(kind, colour, cx / width, cy / height, size, direction, travel_px / unit, scale_change)


# --------------------------------------------------------------------------- rendering
def _coverage(shape: ShapeSpec, frames: int, height: int, width: int) -> np.ndarray:
    """Per-pixel coverage in 0..1, [frames, H, W] float32, from a (near-)signed distance in pixels.

    Coverage = clip(0.5 - distance, 0, 1) is a one-pixel linear ramp across the edge: anti-aliasing without
    supersampling. Box and triangle distances use the max of edge distances, exact except near corners.
    """
    cx, cy, r = (a.astype(np.float32)[:, None, None] for a in _trajectory(shape, frames, height, width))
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5 - cx
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5 - cy
    if shape.kind == "circle":
        dist = np.sqrt(xs * xs + ys * ys) - r
    elif shape.kind == "square":
        dist = np.maximum(np.abs(xs) - r, np.abs(ys) - r)
    else:  # triangle: apex (0, -4r/3), base corners (+-r, 2r/3); centroid at the origin
        base = ys - r * (2.0 / 3.0)
        # Slanted edges: the line through the apex and a base corner, outward unit normal (2, -1)/sqrt(5)
        # (mirrored for x < 0).
        slant = (2.0 * np.abs(xs) - ys - r * (4.0 / 3.0)) / math.sqrt(5.0)
        dist = np.maximum(base, slant)
    return np.clip(0.5 - dist, 0.0, 1.0)


def render(spec: ClipSpec) -> np.ndarray:
    """Render a clip to uint8 [frames, H, W, 3]."""
    f, h, w = spec.frames, spec.height, spec.width
    out = np.empty((f, h, w, 3), dtype=np.float32)
    out[:] = np.asarray(COLOURS[spec.background], dtype=np.float32)
    for shape in spec.shapes:
        alpha = _coverage(shape, f, h, w)[..., None]
        colour = np.asarray(SHAPE_COLOURS[shape.colour], dtype=np.float32)
        out += alpha * (colour - out)
    return np.rint(out).astype(np.uint8)


# --------------------------------------------------------------------------- train / held-out split
def combo_is_heldout(colour: str, kind: str, direction: str, background: str) -> bool:
    """Stable across runs and machines (not Python's salted hash)."""
    digest = hashlib.blake2b(f"{colour}|{kind}|{direction}|{background}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < HELDOUT_FRACTION


@lru_cache(maxsize=None)
def combos(split: str) -> tuple[tuple[str, str, str, str], ...]:
    """All (colour, shape, direction, background) combinations of a split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise KineFlowError(f"split must be 'train' or 'heldout'; got {split!r}")
    want_heldout = split == "heldout"
    return tuple(
        (c, k, d, b)
        for c in COLOURS
        for k in SHAPES
        for d in DIRECTIONS
        for b in COLOURS
        if b != c and combo_is_heldout(c, k, d, b) == want_heldout
    )


@lru_cache(maxsize=None)
def concept_combos(concept: str, split: str) -> tuple[tuple[str, str, str, str], ...]:
    """The (colour, shape, direction, background) combinations of a concept's split (shapes/attributes.py CONCEPTS).
    A colour concept's are split by the same hash as the palette's, so its held-out prompts are combinations its
    training never drew; a speed concept's are the palette's own combinations of the split that move (not
    "still"), so held-out combinations stay held-out."""
    if concept not in CONCEPTS:
        raise KineFlowError(f"unknown concept {concept!r}; expected one of {list(CONCEPTS)}")
    if split not in ("train", "heldout"):
        raise KineFlowError(f"split must be 'train' or 'heldout'; got {split!r}")
    if CONCEPTS[concept].kind == "speed":
        return tuple(c for c in combos(split) if c[2] != "still")
    return tuple((concept, k, d, b) for k in SHAPES for d in DIRECTIONS for b in COLOURS
                 if combo_is_heldout(concept, k, d, b) == (split == "heldout"))


def spec_split(spec: ClipSpec) -> str:
    """'heldout' if any shape of the clip uses a held-out combination, else 'train'."""
    held = any(combo_is_heldout(s.colour, s.kind, s.direction, spec.background) for s in spec.shapes)
    return "heldout" if held else "train"


def sample_spec(
    rng: np.random.Generator,
    split: str = "train",
    *,
    frames: int = 9,
    height: int = 64,
    width: int = 64,
    two_shape_prob: float = 0.25,
    scale_change_prob: float = 0.4,
    concept: str = "",
    twin: bool = False,
) -> ClipSpec:
    """Draw a random clip of the split. Two-shape clips have no scale change (kept simple for a tiny model).
    With `concept` (a shapes/attributes.py CONCEPTS name) the first shape carries it, from the concept's
    combinations: a colour concept's colour, or a speed concept's travel (FAST_TRAVEL_RANGE, always one shape).
    `twin` (a speed concept): the same draw at the normal travel and without the speed, the clip the concept clip
    would be without its word (the random numbers drawn are the same, so the scene is the same)."""
    validate_frames(frames)
    table = concept_combos(concept, split) if concept else combos(split)
    colour, kind, direction, background = table[rng.integers(len(table))]
    two = rng.random() < two_shape_prob
    fast = concept in SPEED_CONCEPTS
    two = two and not fast
    if two:
        scale = "none"
    else:
        scale = "none" if rng.random() >= scale_change_prob else ("grows" if rng.random() < 0.5 else "shrinks")
    geometry = dict(frames=frames, height=height, width=width)
    if not two:
        if fast and not twin:
            first = place_shape(rng, kind, colour, direction, scale, travel_range=FAST_TRAVEL_RANGE, **geometry)
            return ClipSpec(background, (dataclasses.replace(first, speed=concept),), frames, height, width)
        first = place_shape(rng, kind, colour, direction, scale, **geometry)
        return ClipSpec(background, (first,), frames, height, width)
    # The first-named shape stays in the left half, the second in the right half, so they never overlap.
    two_shape = dict(size_range=TWO_SHAPE_SIZE_RANGE, travel_range=TWO_SHAPE_TRAVEL_RANGE, **geometry)
    first = place_shape(rng, kind, colour, direction, "none", region=(0.0, 0.5), **two_shape)
    # The second shape always uses a training combination with the same background and another colour.
    candidates = [c for c in combos("train") if c[3] == background and c[0] != colour]
    c2, k2, d2, _ = candidates[rng.integers(len(candidates))]
    second = place_shape(rng, k2, c2, d2, "none", region=(0.5, 1.0), **two_shape)
    return ClipSpec(background, (first, second), frames, height, width)


# --------------------------------------------------------------------------- captions
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
DIRECTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward", "toward the top"),
    "down": ("down", "downward", "toward the bottom"),
    "up-left": ("up and to the left", "toward the upper left", "diagonally up-left"),
    "up-right": ("up and to the right", "toward the upper right", "diagonally up-right"),
    "down-left": ("down and to the left", "toward the lower left", "diagonally down-left"),
    "down-right": ("down and to the right", "toward the lower right", "diagonally down-right"),
}
MOVE_VERBS = (
    ("moves", "moving"),
    ("slides", "sliding"),
    ("drifts", "drifting"),
    ("glides", "gliding"),
    ("travels", "travelling"),
)
STILL_VERB = ("stays still", "does not move", "sits still", "remains motionless", "stays in place")
STILL_PARTICIPLE = ("standing still", "not moving", "staying in place", "motionless")
GROW_VERB = ("and grows", "while growing", "and gets bigger", "and expands")
GROW_PARTICIPLE = ("and growing", "while growing", "getting bigger", "expanding")
SHRINK_VERB = ("and shrinks", "while shrinking", "and gets smaller", "and contracts")
SHRINK_PARTICIPLE = ("and shrinking", "while shrinking", "getting smaller", "contracting")

# Placeholders: {o} object ("a red ball"), {O} object without article ("red ball"), {v} verb phrase
# ("slides left and grows"), {p} participle phrase ("sliding left"), {b} background colour name.
SINGLE_TEMPLATES = {
    "train": (
        "{o} {v} on a {b} background",
        "{O} {p}, {b} backdrop",
        "{o} {p} against a {b} background",
        "{b} background with {o} {p}",
        "on a {b} background, {o} {v}",
        "{o} {v}. the background is {b}.",
        "{O} {p} over a {b} backdrop",
    ),
    "heldout": (
        "{b} backdrop: {o} that {v}",
        "there is {o} {p} in front of a {b} background",
        "a clip of {o} {p}, plain {b} background",
        "the background is {b} and {o} {v}",
    ),
    # More training phrasings, for models whose text pathway otherwise learns only the seven above (the
    # AnimateDiff UNet reads CLIP's causal token states directly, with no text refiner). Written to vary
    # sentence shape and punctuation, not after the held-out set: none shares a held-out template's wording.
    "extra": (
        "{o} {v} over a {b} background",
        "a {b} background and {o} {p}",
        "with a {b} backdrop, {o} {v}",
        "{o} {v}, all on a {b} background",
        "{b} background. {o} {v}.",
        "we see {o} {p} on a {b} background",
        "{o} is {p} across a {b} backdrop",
        "video of {o} {p} on a {b} background",
        "a {b} coloured background, {o} {p}",
        "here {o} {v} against a {b} backdrop",
        "{O} {p} with a {b} background behind it",
    ),
}
TWO_TEMPLATES = {
    "train": (
        "{o1} {v1} and {o2} {v2} on a {b} background",
        "{b} background: {o1} {p1}, {o2} {p2}",
        "{o1} {v1} while {o2} {v2}, {b} backdrop",
    ),
    "heldout": (
        "there is {o1} {p1} and {o2} {p2} in front of a {b} background",
        "the background is {b}; {o1} {v1} and {o2} {v2}",
    ),
    "extra": (
        "{o1} {v1}, {o2} {v2}, {b} background",
        "on a {b} backdrop {o1} {v1} while {o2} {v2}",
        "{O1} {p1} and {O2} {p2} over a {b} backdrop",
        "with a {b} background, {o1} {v1} and {o2} {v2}",
        "we see {o1} {p1} and {o2} {p2} on a {b} background",
        "{o1} {v1}. {o2} {v2}. {b} background.",
        "a {b} background with {o1} {p1} and {o2} {p2}",
    ),
}


# The template sets each `caption(templates=...)` choice draws from.
TEMPLATE_POOLS = {"train": ("train",), "heldout": ("heldout",), "any": ("train", "heldout"),
                  "extended": ("train", "extra")}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrases(shape: ShapeSpec, rng: np.random.Generator) -> dict[str, str]:
    noun = f"{shape.colour} {_pick(rng, SHAPE_WORDS[shape.kind])}"
    if shape.direction == "still":
        verb, part = _pick(rng, STILL_VERB), _pick(rng, STILL_PARTICIPLE)
    else:
        v, p = MOVE_VERBS[rng.integers(len(MOVE_VERBS))]
        where = _pick(rng, DIRECTION_WORDS[shape.direction])
        if shape.speed:  # "moves quickly to the left" or "moves to the left quickly" (never inside the direction)
            word = _pick(rng, CONCEPTS[shape.speed].words)
            where = f"{word} {where}" if rng.random() < 0.5 else f"{where} {word}"
        verb, part = f"{v} {where}", f"{p} {where}"
    if shape.scale_change == "grows":
        verb, part = f"{verb} {_pick(rng, GROW_VERB)}", f"{part} {_pick(rng, GROW_PARTICIPLE)}"
    elif shape.scale_change == "shrinks":
        verb, part = f"{verb} {_pick(rng, SHRINK_VERB)}", f"{part} {_pick(rng, SHRINK_PARTICIPLE)}"
    return {"o": f"{_article(noun)} {noun}", "O": noun, "v": verb, "p": part}


def caption(spec: ClipSpec, rng: np.random.Generator, templates: str = "train") -> str:
    """A plain-English description of the clip.

    templates: "train" uses the training sentence templates only; "heldout" uses templates never seen in
    training; "any" picks from both sets; "extended" from the training and the extra training templates.
    """
    if templates not in TEMPLATE_POOLS:
        raise KineFlowError(f"templates must be one of {sorted(TEMPLATE_POOLS)}; got {templates!r}")
    table = SINGLE_TEMPLATES if len(spec.shapes) == 1 else TWO_TEMPLATES
    pool = sum((table[name] for name in TEMPLATE_POOLS[templates]), ())
    template = _pick(rng, pool)
    if len(spec.shapes) == 1:
        words = _phrases(spec.shapes[0], rng)
    else:
        words = {}
        for i, shape in enumerate(spec.shapes, start=1):
            words.update({f"{k}{i}": v for k, v in _phrases(shape, rng).items()})
    return template.format(b=spec.background, **words)


# --------------------------------------------------------------------------- dataset for the trainer
def clip_tensor(spec: ClipSpec) -> torch.Tensor:
    """The rendered clip as float32 [frames, H, W, 3] in 0..1 (ComfyUI's IMAGE layout)."""
    return torch.from_numpy(render(spec)).float().div_(255.0)


@dataclass
class ShapesVideoDataset(torch.utils.data.Dataset):
    """An indexable, deterministic dataset: item i depends only on (seed, split, i), never on access order.

    Yields (video float32 [F, H, W, 3] in 0..1, caption, spec).
    """

    length: int = 10_000
    seed: int = 0
    split: str = "train"
    frames: int = 9
    height: int = 64
    width: int = 64
    two_shape_prob: float = 0.25
    scale_change_prob: float = 0.4
    caption_templates: str = ""  # "" -> "train" for the train split, "any" for held-out
    concept: str = ""  # a CONCEPTS name: every clip's first shape carries that concept (see sample_spec)
    twins: bool = False  # with a speed concept: each clip is its concept clip's twin (see sample_spec)

    def __post_init__(self):
        validate_frames(self.frames)
        combos(self.split)  # validates the split name
        if self.concept:
            concept_combos(self.concept, self.split)  # validates the concept name
        if self.twins and self.concept not in SPEED_CONCEPTS:
            raise KineFlowError(f"twins are the normal-speed clips of a speed concept ({list(SPEED_CONCEPTS)}); "
                                f"got concept {self.concept!r}")
        if not self.caption_templates:
            self.caption_templates = "train" if self.split == "train" else "any"

    def __len__(self) -> int:
        return self.length

    def spec_and_caption(self, index: int) -> tuple[ClipSpec, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} clips")
        split_id = 0 if self.split == "train" else 1
        rng = np.random.default_rng([self.seed, split_id, index])
        spec = sample_spec(
            rng,
            self.split,
            frames=self.frames,
            height=self.height,
            width=self.width,
            two_shape_prob=self.two_shape_prob,
            scale_change_prob=self.scale_change_prob,
            concept=self.concept,
            twin=self.twins,
        )
        return spec, caption(spec, rng, self.caption_templates)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, ClipSpec]:
        spec, text = self.spec_and_caption(index)
        return clip_tensor(spec), text, spec

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[str], list[ClipSpec]]:
        """Stack several items: videos [B, F, H, W, 3] float32 0..1, captions, specs."""
        specs, texts = zip(*(self.spec_and_caption(int(i)) for i in indices))
        videos = np.stack([render(s) for s in specs])
        return torch.from_numpy(videos).float().div_(255.0), list(texts), list(specs)

    def batches(self, batch_size: int, epoch: int = 0) -> Iterator[tuple[torch.Tensor, list[str], list[ClipSpec]]]:
        """One pass over the dataset in a shuffled order that depends on (seed, epoch)."""
        order = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.length)
        for start in range(0, self.length, batch_size):
            yield self.batch(order[start : start + batch_size])
