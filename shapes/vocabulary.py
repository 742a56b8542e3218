"""The words of the shapes world's captions, and prompt rewriting for models that know no others.

The shipped tiny models learned to read these captions and nothing else: any other word means nothing to them
(the HunyuanVideo-family tokenizer turns it into `[UNK]`; the AnimateDiff model's CLIP never trained on it), so
a prompt asking for a purple star gives a video of whatever the remaining words suggest. For those models the
runtime rewrites common synonyms into caption words (`Vocabulary.normalize`) and names the words still unknown
(`Vocabulary.unknown_words`, `unknown_words_message`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .dataset import (
    COLOURS,
    DIRECTION_WORDS,
    GROW_PARTICIPLE,
    GROW_VERB,
    MOVE_VERBS,
    SHAPE_WORDS,
    SHRINK_PARTICIPLE,
    SHRINK_VERB,
    SINGLE_TEMPLATES,
    STILL_PARTICIPLE,
    STILL_VERB,
    TWO_TEMPLATES,
)
from .shipped import TEXT_ENCODER_TEMPLATES

# A word as the tokenizers see one: letters and digits (punctuation and underscores separate words).
WORD_RE = re.compile(r"[^\W_]+")
TEMPLATE_SETS = tuple(SINGLE_TEMPLATES)  # "train", "heldout", "extra"

# Words the captions never use, with the caption phrase that means the same. Only exact equivalents: a colour
# name maps only to the palette colour CSS/X11 define it as (aqua is cyan, fuchsia is magenta; grey, orange,
# purple, ... match none), a verb only to a phrase of the same form ("rises" -> "moves up", "rising" -> "moving up").
SYNONYMS: dict[str, str] = {
    **{word: "moves up" for word in ("rises", "climbs", "ascends")},
    **{word: "moving up" for word in ("rising", "climbing", "ascending")},
    **{word: "move up" for word in ("rise", "climb", "ascend")},
    **{word: "moves down" for word in ("falls", "sinks", "drops", "descends")},
    **{word: "moving down" for word in ("falling", "sinking", "dropping", "descending")},
    **{word: "move down" for word in ("fall", "sink", "drop", "descend")},
    **{word: "moves" for word in ("goes", "heads", "rolls", "floats")},
    **{word: "moving" for word in ("going", "heading", "rolling", "floating")},
    "traveling": "travelling",
    "upwards": "upward", "downwards": "downward", "leftwards": "leftward", "rightwards": "rightward",
    "towards": "toward",
    "stationary": "still", "static": "still", "immobile": "still",
    "enlarges": "grows", "enlarging": "growing", "swells": "grows", "swelling": "growing", "larger": "bigger",
    "disk": "disc", "sphere": "circle", "orb": "circle", "cube": "square",
    "aqua": "cyan", "fuchsia": "magenta",
}


def words(text: str) -> list[str]:
    """The lower-cased words of `text`, in order."""
    return WORD_RE.findall(text.lower())


def caption_phrases(template_sets: tuple[str, ...] = TEMPLATE_SETS) -> list[str]:
    """Every phrase the captions are built from: the sentence templates of `template_sets` (placeholders removed)
    and the phrases that fill them (colours, articles, shape words, directions, verbs)."""
    texts = [re.sub(r"\{\w+\}", " ", t) for table in (SINGLE_TEMPLATES, TWO_TEMPLATES)
             for name in template_sets for t in table[name]]
    texts += list(COLOURS) + ["a", "an"]
    texts += [w for options in SHAPE_WORDS.values() for w in options]
    texts += [w for options in DIRECTION_WORDS.values() for w in options]
    texts += [w for pair in MOVE_VERBS for w in pair]
    for table in (STILL_VERB, STILL_PARTICIPLE, GROW_VERB, GROW_PARTICIPLE, SHRINK_VERB, SHRINK_PARTICIPLE):
        texts += list(table)
    return texts


def replace_synonyms(text: str, keep: frozenset[str] = frozenset()) -> tuple[str, list[tuple[str, str]]]:
    """`text` with every word of SYNONYMS (but those in `keep`) replaced by its caption phrase, and the
    (word, phrase) pairs replaced, each once. Everything else of `text` is kept as it is."""
    replaced: dict[str, str] = {}

    def substitute(match: re.Match) -> str:
        word = match.group(0).lower()
        if word in keep or word not in SYNONYMS:
            return match.group(0)
        replaced[word] = SYNONYMS[word]
        return SYNONYMS[word]

    return WORD_RE.sub(substitute, text), list(replaced.items())


@dataclass(frozen=True)
class Vocabulary:
    """The words a text encoder learned (lower case)."""

    words: frozenset[str]

    @classmethod
    def of_captions(cls, template_sets: tuple[str, ...] = TEMPLATE_SETS) -> Vocabulary:
        """The words of the captions written with the sentence templates of `template_sets`."""
        return cls(frozenset(w for phrase in caption_phrases(template_sets) for w in words(phrase)))

    def normalize(self, prompt: str) -> tuple[str, list[tuple[str, str]]]:
        """`prompt` with the synonyms this vocabulary lacks rewritten into caption words, and what was rewritten.
        A prompt of known words comes back unchanged."""
        return replace_synonyms(prompt, keep=self.words)

    def unknown_words(self, prompt: str) -> list[str]:
        """The words of `prompt` outside the vocabulary, each once, in order."""
        return list(dict.fromkeys(w for w in words(prompt) if w not in self.words))


def text_encoder_vocabulary(file_name: str) -> Vocabulary | None:
    """The words the shipped text encoder of that file name knows; None for a name that is not one."""
    templates = TEXT_ENCODER_TEMPLATES.get(file_name)
    return None if templates is None else Vocabulary.of_captions(templates)


def known_words_summary() -> str:
    """The words that carry a scene, in one line (for warnings)."""
    shapes = ", ".join(f"{name} (or {', '.join(options[1:])})" if len(options) > 1 else name
                       for name, options in SHAPE_WORDS.items())
    return (f"colours {', '.join(COLOURS)}; shapes {shapes}; directions left, right, up, down, diagonals such as "
            f"'up and to the left' or 'toward the lower right', and 'stays still'; sizes 'grows', 'shrinks'")


def unknown_words_message(prompt: str, unknown: list[str]) -> str:
    """A warning naming the words of `prompt` a shipped tiny model does not know, and the words it does know."""
    listed = ", ".join(repr(w) for w in unknown)
    return (f"prompt {prompt!r} has words the shipped tiny model does not know: {listed}. It learned only the "
            f"shapes world's captions and reads other words as nothing. It knows {known_words_summary()}.")
