"""What a shapes-world clip is made of: colours, shapes, directions and scale changes.

Plain Python, so that the Shapes Video node offers these choices without importing torch or numpy (the node
registry loads on every `kineflow` command); shapes/dataset.py renders them.
"""

import math
from dataclasses import dataclass

# The eight corners of the RGB cube (pulled slightly inside it): every pair is >= 0.8 apart in 0..1 units,
# which leaves a wide margin for the colour shifts and blur of a tiny VAE.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 230, 25),
    "blue": (25, 25, 230),
    "yellow": (230, 230, 25),
    "cyan": (25, 230, 230),
    "magenta": (230, 25, 230),
    "white": (235, 235, 235),
    "black": (20, 20, 20),
}
# Colours outside the palette, each a concept a LoRA can teach the shipped tiny model (training/train_lora.py). They
# are never drawn in the base model's clips nor in its held-out set (which iterate COLOURS only); a concept clip gives
# its first shape the concept's colour over a palette background. Orange sits between red and yellow, ~0.4 from each
# in 0..1 units and far from the rest, so the judge tells it from both.
CONCEPT_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (235, 130, 20),
}


@dataclass(frozen=True)
class Concept:
    """A word the shipped tiny model never saw that a LoRA can teach it (training/train_lora.py).

    kind "colour": a concept clip's first shape has the colour CONCEPT_COLOURS[name] (the word is a colour word).
    kind "speed": a concept clip's first shape travels farther than any base clip's (shapes/dataset.py
    FAST_TRAVEL_RANGE), and its caption says so with one of `words` next to the direction.
    `words`: the words a caption uses for it, the trigger words of a LoRA that teaches it.
    """

    name: str
    kind: str  # "colour" or "speed"
    words: tuple[str, ...]


CONCEPTS: dict[str, Concept] = {
    "orange": Concept("orange", "colour", ("orange",)),
    # Not in the captions' vocabulary (the tiny LLaMA reads each as [UNK]; CLIP-L has a token for each).
    "quickly": Concept("quickly", "speed", ("quickly", "fast", "rapidly")),
}
SPEED_CONCEPTS: tuple[str, ...] = tuple(name for name, c in CONCEPTS.items() if c.kind == "speed")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit vectors in image coordinates (x to the right, y downwards).
_D = 1.0 / math.sqrt(2.0)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_D, -_D),
    "up-right": (_D, -_D),
    "down-left": (-_D, _D),
    "down-right": (_D, _D),
    "still": (0.0, 0.0),
}
SCALE_CHANGES: tuple[str, ...] = ("none", "grows", "shrinks")
# Linear size factor between the first and the last frame of a growing clip (area factor 2.56).
GROWTH_FACTOR = 1.6
