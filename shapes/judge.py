"""Analytic judge: reads background, shapes, colours, motion and size change back out of a generated clip.

Pipeline for a clip [F, H, W, 3] (float 0..1 or uint8):
1. Background: per-channel median of the border pixels over all frames, named by the nearest palette colour.
2. Object colours: "core" pixels are pixels whose nearest palette colour is clearly nearer than the second
   nearest (distance ratio < CORE_RATIO), which rejects anti-aliased / blurred edge mixtures that sit between
   two palette colours. Each non-background palette colour with enough core pixels is one object; its measured
   colour is the median of its core pixels (so a tinted or desaturated output still segments well).
3. Object masks: every pixel goes to the nearest of {background, object colours} (the 50 % coverage contour
   for blurred edges); per frame only the largest 4-connected component of each object is kept.
4. Per object: shape from the fill ratio (object area / bounding-box area: square 1, circle pi/4, triangle
   1/2, in any orientation), measured blur-invariantly from the soft coverage map (see `_soft_fill`); direction
   = the least-squares centroid displacement over
   the clip, "still" below STILL_TRAVEL, else one of 8 compass sectors; scale change = the fitted area ratio
   between the last and first frame against GROWTH_AREA_RATIO.
5. Temporal consistency of an object, in 0..1: the mean over consecutive frame pairs of the IoU of the two
   masks after each is cropped to its bounding box and resampled to a 16x16 grid (so translation and size
   change do not count, only a change of shape); a pair where the object is missing in either frame scores 0.

Objects are reported largest first (mean area). Two-shape clips are judged fully: `score` matches each
expected shape to the detected object of the same colour; a one-shape prompt is compared with the largest
object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from ..errors import KineFlowError
from .attributes import CONCEPTS
from .dataset import COLOURS, FAST_TRAVEL_RANGE, GROWTH_FACTOR, SHAPE_COLOURS, TRAVEL_RANGE
from .prompts import UNKNOWN, ObjectAttributes, PromptAttributes

PALETTE_NAMES = tuple(COLOURS)
PALETTE = np.asarray([COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32) / 255.0


def concept_palette(*concepts: str) -> tuple[str, ...]:
    """The colour names the judge tells apart when scoring concept clips: the palette and those concept colours."""
    unknown = [c for c in concepts if c not in SHAPE_COLOURS]
    if unknown:
        raise KineFlowError(f"unknown colour(s) {unknown}; the judge knows {list(SHAPE_COLOURS)}")
    return PALETTE_NAMES + tuple(c for c in dict.fromkeys(concepts) if c not in PALETTE_NAMES)


def _palette_rgb(names: tuple[str, ...]) -> np.ndarray:
    return PALETTE if names == PALETTE_NAMES else \
        np.asarray([SHAPE_COLOURS[n] for n in names], dtype=np.float32) / 255.0
CORE_RATIO = 0.6  # nearest / second-nearest palette distance below which a pixel is a "core" colour pixel
MIN_OBJECT_FRACTION = 0.1  # of the largest object's core pixel count
MIN_OBJECT_PIXELS = 0.001  # of the frame, per frame (and at least 4 pixels)
MIN_FRAME_PIXELS = 3  # an object mask smaller than this in a frame counts as absent there
STILL_TRAVEL = 0.06  # total displacement over the clip below this fraction of the shorter side -> "still"
# A shape asked to move quickly (a speed concept) moved quickly when its travel exceeds this: midway between the
# longest normal travel and the shortest fast one (shapes/dataset.py TRAVEL_RANGE, FAST_TRAVEL_RANGE): 0.47.
FAST_TRAVEL = (TRAVEL_RANGE[1] + FAST_TRAVEL_RANGE[0]) / 2.0
# Geometric midpoint between no change and the generator's area change (GROWTH_FACTOR ** 2).
GROWTH_AREA_RATIO = GROWTH_FACTOR
# Shape thresholds on the fill ratio. Blur lowers a square's fill (rounded corners) and raises a triangle's
# (its apex fades, shortening the measured height), so both sit nearer the circle's pi/4 than the midpoints.
SQUARE_MIN_FILL = 0.835
TRIANGLE_MAX_FILL = 0.74
CONSISTENCY_GRID = 16
SECTORS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")


@dataclass(frozen=True)
class ObjectVerdict:
    colour: str
    colour_rgb: tuple[float, float, float]  # measured, 0..1
    shape: str
    fill_ratio: float  # object area / bounding-box area: square 1, circle pi/4, triangle 1/2
    direction: str
    travel: float  # centroid displacement over the clip, fraction of the shorter side
    speed: float  # travel per frame
    scale_change: str
    area_ratio: float  # fitted last-frame area / first-frame area
    mean_area: float  # fraction of the frame
    presence: float  # fraction of frames where the object was found
    temporal_consistency: float


@dataclass(frozen=True)
class Verdict:
    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[ObjectVerdict, ...]  # largest first

    @property
    def primary(self) -> ObjectVerdict | None:
        return self.objects[0] if self.objects else None

    @property
    def colour(self) -> str:
        return self.primary.colour if self.primary else "none"

    @property
    def shape(self) -> str:
        return self.primary.shape if self.primary else "none"

    @property
    def direction(self) -> str:
        return self.primary.direction if self.primary else "none"

    @property
    def scale_change(self) -> str:
        return self.primary.scale_change if self.primary else "none"

    @property
    def temporal_consistency(self) -> float:
        """Mean over detected objects; 0 when nothing was detected."""
        return float(np.mean([o.temporal_consistency for o in self.objects])) if self.objects else 0.0


# --------------------------------------------------------------------------- helpers
def _as_float_clip(clip) -> np.ndarray:
    if isinstance(clip, torch.Tensor):
        clip = clip.detach().cpu().numpy()
    arr = np.asarray(clip)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise KineFlowError(f"the judge expects a clip [frames, H, W, 3]; got an array of shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _squared_distances(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """[N, 3] x [K, 3] -> [N, K] squared RGB distances."""
    return (pixels * pixels).sum(1, keepdims=True) - 2.0 * pixels @ colours.T + (colours * colours).sum(1)[None]


LUT_BITS = 5  # per channel; quantisation error (1/64) is far below the palette spacing


def _lut_index(pixels: np.ndarray) -> np.ndarray:
    q = np.minimum((pixels * (1 << LUT_BITS)).astype(np.int32), (1 << LUT_BITS) - 1)
    return (q[:, 0] << (2 * LUT_BITS)) | (q[:, 1] << LUT_BITS) | q[:, 2]


@lru_cache(maxsize=4)
def _palette_tables(names: tuple[str, ...] = PALETTE_NAMES) -> tuple[np.ndarray, np.ndarray]:
    """For every quantised RGB cell: index of the nearest colour of `names`, and whether the pixel is "core"."""
    levels = (np.arange(1 << LUT_BITS, dtype=np.float32) + 0.5) / (1 << LUT_BITS)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    dist2 = _squared_distances(grid, _palette_rgb(names))
    two_smallest = np.partition(dist2, 1, axis=1)[:, :2]
    return np.argmin(dist2, axis=1), two_smallest[:, 0] < CORE_RATIO**2 * two_smallest[:, 1]


def _nearest_palette(rgb: np.ndarray, names: tuple[str, ...] = PALETTE_NAMES) -> str:
    return names[int(np.argmin(np.linalg.norm(_palette_rgb(names) - rgb, axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean [H, W] mask (by min-label propagation on its bounding box)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return mask
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    sentinel = crop.size
    labels = np.where(crop, np.arange(crop.size).reshape(crop.shape), sentinel)
    while True:
        updated = labels.copy()
        np.minimum(updated[1:], labels[:-1], out=updated[1:])
        np.minimum(updated[:-1], labels[1:], out=updated[:-1])
        np.minimum(updated[:, 1:], labels[:, :-1], out=updated[:, 1:])
        np.minimum(updated[:, :-1], labels[:, 1:], out=updated[:, :-1])
        updated[~crop] = sentinel
        # Pointer jumping: a label is the index of a pixel of the same component, so adopting that pixel's
        # label is safe and makes the propagation converge in far fewer rounds.
        updated = np.append(updated.ravel(), sentinel)[updated]
        if np.array_equal(updated, labels):
            break
        labels = updated
    values, counts = np.unique(labels[crop], return_counts=True)
    out = np.zeros_like(mask)
    out[y0:y1, x0:x1] = labels == values[np.argmax(counts)]
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _normalised(mask: np.ndarray) -> np.ndarray:
    """The mask cropped to its bounding box, resampled (nearest) to a CONSISTENCY_GRID square."""
    crop = _crop(mask)
    idx = (np.arange(CONSISTENCY_GRID) + 0.5) / CONSISTENCY_GRID
    rows = np.minimum((idx * crop.shape[0]).astype(int), crop.shape[0] - 1)
    cols = np.minimum((idx * crop.shape[1]).astype(int), crop.shape[1] - 1)
    return crop[np.ix_(rows, cols)]


def _slope(t: np.ndarray, values: np.ndarray) -> float:
    """Least-squares slope of values over t (needs two or more distinct t)."""
    tc = t - t.mean()
    return float((tc * (values - values.mean())).sum() / (tc * tc).sum())


# --------------------------------------------------------------------------- judge
def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _soft_fill(alpha: np.ndarray, region: np.ndarray) -> float:
    """Blur-invariant fill ratio: object mass / (soft width x soft height), from the coverage map alpha.

    Blurring preserves the total coverage (the mass) and the 50 % crossing of straight edges, so the width and
    height read from the max-coverage profiles (with a ramp that keeps the 50 % crossing) do not change either.
    """
    a = np.where(region, np.clip(alpha, -0.5, 1.5), 0.0)
    mass = a.sum()
    profile = np.clip(a, 0.0, 1.0)
    width = np.clip((profile.max(axis=0) - 0.1) / 0.8, 0.0, 1.0).sum()
    height = np.clip((profile.max(axis=1) - 0.1) / 0.8, 0.0, 1.0).sum()
    return float(mass / (width * height)) if width > 0 and height > 0 else 0.0


def _judge_object(
    name: str, rgb: np.ndarray, masks: np.ndarray, alpha: np.ndarray, allowed: np.ndarray, unit: int
) -> ObjectVerdict:
    """masks: the object's per-frame masks; alpha: its coverage estimate per pixel; allowed: pixels not taken
    by another object (the soft measurements look slightly beyond the mask, but never into another object)."""
    f, h, w = masks.shape
    areas = masks.reshape(f, -1).sum(axis=1).astype(np.float64)
    present = areas >= MIN_FRAME_PIXELS
    frames = np.nonzero(present)[0]

    # Shape: median blur-invariant fill ratio over the frames where the object is present.
    fill = float(np.median([_soft_fill(alpha[t], _dilate(masks[t], 3) & allowed[t]) for t in frames]))
    shape = "square" if fill >= SQUARE_MIN_FILL else ("circle" if fill >= TRIANGLE_MAX_FILL else "triangle")

    # Motion: least-squares centroid displacement over the whole clip.
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    cy = np.array([(masks[t].sum(axis=1) * ys).sum() / areas[t] for t in frames])
    cx = np.array([(masks[t].sum(axis=0) * xs).sum() / areas[t] for t in frames])
    if len(frames) >= 2:
        span = f - 1
        dx, dy = _slope(frames.astype(np.float64), cx) * span, _slope(frames.astype(np.float64), cy) * span
        area_ratio = math.exp(_slope(frames.astype(np.float64), np.log(areas[frames])) * span)
    else:
        dx = dy = 0.0
        area_ratio = 1.0
    travel = math.hypot(dx, dy) / unit
    if travel < STILL_TRAVEL:
        direction = "still"
    else:
        angle = math.degrees(math.atan2(-dy, dx))  # image y points down; "up" is +90 degrees
        direction = SECTORS[int(round(angle / 45.0)) % 8]
    if area_ratio > GROWTH_AREA_RATIO:
        scale_change = "grows"
    elif area_ratio < 1.0 / GROWTH_AREA_RATIO:
        scale_change = "shrinks"
    else:
        scale_change = "none"

    pair_scores = [
        _iou(_normalised(masks[t]), _normalised(masks[t + 1])) if present[t] and present[t + 1] else 0.0
        for t in range(f - 1)
    ]
    consistency = float(np.mean(pair_scores)) if pair_scores else float(present.all())
    return ObjectVerdict(
        colour=name,
        colour_rgb=tuple(float(c) for c in rgb),
        shape=shape,
        fill_ratio=fill,
        direction=direction,
        travel=travel,
        speed=travel / max(f - 1, 1),
        scale_change=scale_change,
        area_ratio=area_ratio,
        mean_area=float(areas.mean() / (h * w)),
        presence=float(present.mean()),
        temporal_consistency=consistency,
    )


def judge(clip, palette: tuple[str, ...] = PALETTE_NAMES) -> Verdict:
    """Judge one clip: float [F, H, W, 3] in 0..1 (numpy or torch) or uint8; a single [H, W, 3] image is one frame.
    `palette`: the colour names to tell apart (`concept_palette(...)` adds concept colours to the palette)."""
    x = _as_float_clip(clip)
    f, h, w, _ = x.shape
    if h < 8 or w < 8:
        raise KineFlowError(f"the judge needs frames of at least 8x8 pixels; got {w}x{h}")
    border = max(1, min(h, w) // 32)
    edges = (x[:, :border], x[:, -border:], x[:, :, :border], x[:, :, -border:])
    ring = np.concatenate([e.reshape(-1, 3) for e in edges])
    bg_rgb = np.median(ring, axis=0)
    bg_name = _nearest_palette(bg_rgb, palette)

    pixels = x.reshape(-1, 3)
    nearest_lut, core_lut = _palette_tables(tuple(palette))
    cell = _lut_index(pixels)
    nearest = nearest_lut[cell]
    core = core_lut[cell] & (nearest != palette.index(bg_name))
    counts = np.bincount(nearest[core], minlength=len(palette))
    min_count = max(MIN_OBJECT_FRACTION * counts.max(), f * max(4.0, MIN_OBJECT_PIXELS * h * w))
    found = [i for i in np.argsort(-counts) if counts[i] >= min_count]
    if not found:
        return Verdict(bg_name, tuple(float(c) for c in bg_rgb), ())

    colours = np.stack([np.median(pixels[core & (nearest == i)], axis=0) for i in found])
    refs = np.concatenate([bg_rgb[None], colours])  # index 0 = background
    assign = np.argmin(_squared_distances(pixels, refs), axis=1).reshape(f, h, w)
    objects = []
    for k, i in enumerate(found, start=1):
        masks = np.stack([_largest_component(frame == k) for frame in assign])
        if (masks.reshape(f, -1).sum(axis=1) >= MIN_FRAME_PIXELS).any():
            axis = colours[k - 1] - bg_rgb
            alpha = ((x - bg_rgb) @ axis / max(float(axis @ axis), 1e-6))
            allowed = (assign == 0) | (assign == k)
            objects.append(_judge_object(palette[i], colours[k - 1], masks, alpha, allowed, min(h, w)))
    objects.sort(key=lambda o: -o.mean_area)
    return Verdict(bg_name, tuple(float(c) for c in bg_rgb), tuple(objects))


# --------------------------------------------------------------------------- scoring
ATTRIBUTES = ("colour", "shape", "direction", "scale_change", "background")


@dataclass
class AttributeScore:
    correct: int = 0
    scored: int = 0
    skipped: int = 0  # expected value "unknown" (the prompt did not say)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None


def _match(verdict: Verdict, expected: PromptAttributes, index: int, want: ObjectAttributes) -> ObjectVerdict | None:
    if len(expected.objects) == 1:
        return verdict.primary
    if want.colour != UNKNOWN:
        return next((o for o in verdict.objects if o.colour == want.colour), None)
    return verdict.objects[index] if index < len(verdict.objects) else None


def score(verdicts: Sequence[Verdict], expected: Sequence[PromptAttributes]) -> dict[str, AttributeScore]:
    """Per-attribute accuracy of verdicts against expected attributes (from `parse_prompt` or a spec).

    A one-shape prompt is compared with the largest detected object; in a two-shape prompt each expected shape
    is matched by colour (by order when the colour is unknown). A missing object makes its attributes wrong.
    """
    if len(verdicts) != len(expected):
        raise KineFlowError(
            f"score needs one verdict per prompt; got {len(verdicts)} verdicts and {len(expected)} prompts"
        )
    result = {a: AttributeScore() for a in ATTRIBUTES}

    def tally(attribute: str, want: str, got: str | None) -> None:
        if want == UNKNOWN:
            result[attribute].skipped += 1
            return
        result[attribute].scored += 1
        result[attribute].correct += int(got == want)

    for verdict, exp in zip(verdicts, expected):
        tally("background", exp.background, verdict.background)
        for index, want in enumerate(exp.objects):
            got = _match(verdict, exp, index, want)
            for attribute in ("colour", "shape", "direction", "scale_change"):
                tally(attribute, getattr(want, attribute), getattr(got, attribute) if got else None)
    return result


def _adherence(verdicts, expected, asked, achieved) -> AttributeScore:
    """Of the expected shapes `asked(want)` selects, matched as `score` matches shapes, how many `achieved(got)`."""
    result = AttributeScore()
    for verdict, exp in zip(verdicts, expected, strict=True):
        for index, want in enumerate(exp.objects):
            if asked(want):
                got = _match(verdict, exp, index, want)
                result.scored += 1
                result.correct += int(got is not None and achieved(got))
    return result


def colour_adherence(verdicts: Sequence[Verdict], expected: Sequence[PromptAttributes], colour: str) -> AttributeScore:
    """How often a shape asked for in `colour` was drawn in it: a concept colour's own figure, apart from the other
    shapes of its prompts."""
    return _adherence(verdicts, expected, lambda want: want.colour == colour, lambda got: got.colour == colour)


def speed_adherence(verdicts: Sequence[Verdict], expected: Sequence[PromptAttributes], speed: str) -> AttributeScore:
    """How often a shape asked to move at the speed concept `speed` (e.g. "quickly") did: its judged travel exceeds
    FAST_TRAVEL (its direction is scored under "direction" with the rest)."""
    return _adherence(verdicts, expected, lambda want: want.speed == speed, lambda got: got.travel > FAST_TRAVEL)


def concept_adherence(verdicts: Sequence[Verdict], expected: Sequence[PromptAttributes], concept: str) -> AttributeScore:
    """A concept's own figure (shapes/attributes.py CONCEPTS): `colour_adherence` for a colour concept,
    `speed_adherence` for a speed concept."""
    if concept not in CONCEPTS:
        raise KineFlowError(f"unknown concept {concept!r}; expected one of {list(CONCEPTS)}")
    if CONCEPTS[concept].kind == "speed":
        return speed_adherence(verdicts, expected, concept)
    return colour_adherence(verdicts, expected, concept)


def concept_judge_palette(concept: str) -> tuple[str, ...]:
    """The palette the judge uses on a concept's clips: the palette plus a colour concept's colour; the palette alone
    for a speed concept ("" = no concept)."""
    return concept_palette(concept) if concept and CONCEPTS[concept].kind == "colour" else PALETTE_NAMES
