"""Held-out evaluation prompts and a parser from free text to the attributes the judge can check.

`parse_prompt` understands the dataset's vocabulary (and the synonyms of shapes/vocabulary.py, plus plurals) in
any word order the caption templates use, so `kineflow eval --prompts FILE` can score prompts written by a user.
Attributes it cannot find are "unknown" and are skipped when scoring; words it does not know are listed in
`unknown_words`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import KineFlowError
from .dataset import COLOURS, SHAPE_WORDS, ClipSpec, caption, sample_spec
from .vocabulary import replace_synonyms

UNKNOWN = "unknown"


@dataclass(frozen=True)
class ObjectAttributes:
    colour: str = UNKNOWN
    shape: str = UNKNOWN
    direction: str = UNKNOWN  # one of dataset.DIRECTIONS or "unknown"
    scale_change: str = "none"  # "none" when the prompt does not mention a size change (the captions' convention)
    speed: str = ""  # a speed concept's name when the shape is asked to move that way (from a spec; not parsed)


@dataclass(frozen=True)
class PromptAttributes:
    background: str = UNKNOWN
    objects: tuple[ObjectAttributes, ...] = ()
    unknown_words: tuple[str, ...] = field(default=(), compare=False)


def expected_from_spec(spec: ClipSpec) -> PromptAttributes:
    """The attributes a perfect video for this spec shows (ground truth for scoring)."""
    return PromptAttributes(
        background=spec.background,
        objects=tuple(ObjectAttributes(s.colour, s.kind, s.direction, s.scale_change, s.speed) for s in spec.shapes),
    )


def heldout_prompts(
    n: int, seed: int = 0, *, frames: int = 9, height: int = 64, width: int = 64, concept: str = ""
) -> list[tuple[str, ClipSpec]]:
    """n (prompt, spec) pairs on held-out attribute combinations; about half use held-out sentence templates.
    With `concept` (shapes/attributes.py CONCEPTS) every prompt's first shape carries it (a concept colour, or a
    speed word and its travel): the concept's own held-out set; without it, the standard set the shipped models are
    scored on, which no concept changes."""
    if n < 0:
        raise KineFlowError(f"number of prompts must be >= 0; got {n}")
    rng = np.random.default_rng([seed, 104729])
    out = []
    for i in range(n):
        spec = sample_spec(rng, "heldout", frames=frames, height=height, width=width, concept=concept)
        out.append((caption(spec, rng, "heldout" if i % 2 else "train"), spec))
    return out


# --------------------------------------------------------------------------- parsing
_SHAPE_LOOKUP = {w: k for k, words in SHAPE_WORDS.items() for w in words}
_SHAPE_LOOKUP.update({"circles": "circle", "balls": "circle", "squares": "square", "boxes": "square",
                      "blocks": "square", "triangles": "triangle"})
_COLOUR_LOOKUP = {c: c for c in COLOURS}
_COLOUR_LOOKUP.update({"grey": UNKNOWN, "gray": UNKNOWN})  # named but not in the palette

_COLOUR_RE = "|".join(sorted(_COLOUR_LOOKUP, key=len, reverse=True))
_SHAPE_RE = "|".join(sorted(_SHAPE_LOOKUP, key=len, reverse=True))
_BACKGROUND_PATTERNS = (
    re.compile(rf"\b(?P<c>{_COLOUR_RE})\s+(?:coloured\s+|colored\s+)?(?:background|backdrop)\b"),
    re.compile(rf"\b(?:background|backdrop)\s+(?:is|of)\s+(?P<c>{_COLOUR_RE})\b"),
)
_OBJECT_RE = re.compile(rf"\b(?:(?P<c>{_COLOUR_RE})\s+)?(?P<s>{_SHAPE_RE})\b")
_LONE_COLOUR_RE = re.compile(rf"\b(?P<c>{_COLOUR_RE})\b")

_UP = r"(?:up|upward|upwards|upper|top)"
_DOWN = r"(?:down|downward|downwards|lower|bottom)"
_LEFT = r"(?:left|leftward|leftwards)"
_RIGHT = r"(?:right|rightward|rightwards)"
_JOIN = r"(?:\s*-\s*|\s+and\s+to\s+the\s+|\s+and\s+|\s+)"
# Diagonals first: "up and to the left", "toward the upper left", "up-left", "diagonally down right".
_DIRECTION_PATTERNS = (
    ("up-left", re.compile(rf"\b{_UP}{_JOIN}{_LEFT}\b")),
    ("up-right", re.compile(rf"\b{_UP}{_JOIN}{_RIGHT}\b")),
    ("down-left", re.compile(rf"\b{_DOWN}{_JOIN}{_LEFT}\b")),
    ("down-right", re.compile(rf"\b{_DOWN}{_JOIN}{_RIGHT}\b")),
    ("still", re.compile(r"\b(?:still|motionless|stationary|static|not\s+moving|(?:does\s+not|doesn't)\s+move)\b")),
    ("still", re.compile(r"\bin\s+place\b")),
    ("left", re.compile(rf"\b{_LEFT}\b")),
    ("right", re.compile(rf"\b{_RIGHT}\b")),
    ("up", re.compile(rf"\b{_UP}\b")),
    ("down", re.compile(rf"\b{_DOWN}\b")),
)
_GROW_RE = re.compile(r"\b(?:grow|grows|growing|bigger|larger|expand|expands|expanding|enlarg\w*|swell\w*)\b")
_SHRINK_RE = re.compile(r"\b(?:shrink|shrinks|shrinking|smaller|contract|contracts|contracting)\b")

# Words that carry no attribute: articles, verbs and connectives of the templates, and common filler.
_FILLER = set(
    """a an the and or of on in at to with while as it its is are there that this which over against
    in front background backdrop plain clip video movie animation scene shot showing shows of across
    moves moving move slides sliding slide drifts drifting drift glides gliding glide travels travelling
    traveling travel goes going heads heading toward towards diagonally diagonal direction
    stays staying stay sits sitting remains remaining standing stands place does not doesn't n't
    gets getting get coloured colored meanwhile then one another other shape shapes frame
    small large big tiny""".split()
)


def _direction_in(text: str) -> str:
    for name, pattern in _DIRECTION_PATTERNS:
        if pattern.search(text):
            return name
    return UNKNOWN


def _scale_in(text: str) -> str:
    if _GROW_RE.search(text):
        return "grows"
    if _SHRINK_RE.search(text):
        return "shrinks"
    return "none"


def _known_word(word: str) -> bool:
    return (
        word in _FILLER
        or word in _COLOUR_LOOKUP
        or word in _SHAPE_LOOKUP
        or _direction_in(word) != UNKNOWN
        or _scale_in(word) != "none"
    )


def parse_prompt(text: str) -> PromptAttributes:
    """Extract background, and per mentioned shape its colour, shape, direction and scale change.

    Each shape's motion words are read from the text between its mention and the next shape's mention; for the
    first shape, words missing there are also looked for before it (e.g. "moving left, a red ball ...").
    """
    lowered = " " + re.sub(r"[^a-z'\- ]+", " ", replace_synonyms(text.lower())[0].replace("_", " ")) + " "
    background, rest = UNKNOWN, lowered
    for pattern in _BACKGROUND_PATTERNS:
        m = pattern.search(rest)
        if m:
            background = _COLOUR_LOOKUP[m.group("c")]
            rest = rest[: m.start()] + " " * (m.end() - m.start()) + rest[m.end() :]
            break

    mentions = list(_OBJECT_RE.finditer(rest))
    if not mentions:  # a colour without a recognised shape word still gives a colour to score
        mentions = list(_LONE_COLOUR_RE.finditer(rest))[:1]
    objects = []
    for i, m in enumerate(mentions):
        colour = _COLOUR_LOOKUP[m.group("c")] if m.group("c") else UNKNOWN
        shape = _SHAPE_LOOKUP[m.group("s")] if "s" in m.re.groupindex and m.group("s") else UNKNOWN
        end = mentions[i + 1].start() if i + 1 < len(mentions) else len(rest)
        segment = rest[m.end() : end]
        direction, scale = _direction_in(segment), _scale_in(segment)
        if i == 0:  # motion words may also come before the first shape
            before = rest[: m.start()]
            direction = _direction_in(before) if direction == UNKNOWN else direction
            scale = _scale_in(before) if scale == "none" else scale
        objects.append(ObjectAttributes(colour, shape, direction, scale))

    words = re.findall(r"[a-z']+", lowered)
    unknown = tuple(dict.fromkeys(w for w in words if not _known_word(w)))
    return PromptAttributes(background, tuple(objects), unknown)
