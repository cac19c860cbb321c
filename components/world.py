"""The synthetic world's vocabulary: attributes, the caption template and its parser.

One owner for the words: the generator draws from these tables, the captioner learns to write
`caption(attrs)`, the judge and the evaluation grade against them, and prompt expansion maps free
wording onto them.
"""

from __future__ import annotations

import itertools
import random
import re

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit direction in image coordinates (x right, y down).
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "diagonal": (0.7071, -0.7071),  # towards the top right
    "still": (0.0, 0.0),
}
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "diagonal": "moving diagonally",
    "still": "staying still",
}
SPEEDS: dict[str, float] = {"slow": 0.5, "fast": 1.0}  # share of the travel span per clip
SPEED_WORDS: dict[str, str] = {"slow": "slowly", "fast": "quickly"}
SIZES: dict[str, float] = {"small": 0.17, "large": 0.25}  # object radius as a share of the side
BACKGROUNDS: tuple[str, ...] = ("black", "grey", "gradient", "noise")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "motion": tuple(MOTIONS),
    "speed": tuple(SPEEDS),
    "size": tuple(SIZES),
    "background": BACKGROUNDS,
}
# The attributes that evaluation grades generated videos on.
GRADED: tuple[str, ...] = ("color", "shape", "motion")
# What each object of a clip has on its own; the background is shared. A clip's second object
# is stored under these names plus SECOND_SUFFIX (`color2`, `shape2`, ...).
OBJECT_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "motion", "speed", "size")
SECOND_SUFFIX = "2"
SECOND_KEYS: tuple[str, ...] = tuple(a + SECOND_SUFFIX for a in OBJECT_ATTRIBUTES)
# Two objects always differ in colour, and the caption names the one whose colour comes first in
# COLORS first: a rule a captioner can see, so "the first object" is defined by the video.


def second_object(attrs: dict) -> dict[str, str] | None:
    """The second object's attributes of a (metadata or manifest) record; None for one object."""
    if not attrs.get("color" + SECOND_SUFFIX):
        return None
    return {a: attrs[a + SECOND_SUFFIX] for a in OBJECT_ATTRIBUTES}


def _object_words(attrs: dict[str, str]) -> list[str]:
    words = ["a", attrs["size"], attrs["color"], attrs["shape"], MOTION_PHRASES[attrs["motion"]]]
    if attrs["motion"] != "still":
        words.append(SPEED_WORDS[attrs["speed"]])
    return words


def caption(attrs: dict[str, str]) -> str:
    """The canonical long caption, e.g. 'a small red circle moving left slowly on a black background'.

    With a second object (`color2`, `shape2`, ... set) both are named, first object first:
    'a small red circle moving left slowly and a large blue square staying still on a black
    background'.
    """
    words = _object_words(attrs)
    second = second_object(attrs)
    if second is not None:
        words += ["and", *_object_words(second)]
    words += ["on", "a", attrs["background"], "background"]
    return " ".join(words)


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> dict[str, str | None]:
    """Attributes named in a caption written in the canonical style; None where absent.

    A caption naming two objects ('... and a ...') gives the first object's attributes (and the
    shared background); `parse_objects` reads both.
    """
    return parse_objects(text)[0]


def parse_objects(text: str) -> list[dict[str, str | None]]:
    """Per object named in a canonical caption (split at 'and'), its attributes plus the shared
    background; always at least one dict (all None for an empty caption)."""
    words = _WORD.findall(text.lower())
    bg = None
    for i, w in enumerate(words):
        if w == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            bg = words[i - 1]
    parts: list[list[str]] = [[]]
    for w in words:
        if w == "and" and parts[-1]:
            parts.append([])
        else:
            parts[-1].append(w)
    if len(parts) > 1 and not parts[-1]:
        parts.pop()
    return [{**_parse_object(p), "background": bg} for p in parts]


def _parse_object(words: list[str]) -> dict[str, str | None]:
    ws = set(words)
    found: dict[str, str | None] = {}
    found["color"] = next((c for c in COLORS if c in ws), None)
    found["shape"] = next((s for s in SHAPES if s in ws), None)
    motion = None
    if "still" in ws:
        motion = "still"
    elif "diagonally" in ws or "diagonal" in ws:
        motion = "diagonal"
    else:
        motion = next((m for m in ("left", "right", "up", "down") if m in ws), None)
    found["motion"] = motion
    speed_of = {w: s for s, w in SPEED_WORDS.items()}
    found["speed"] = next((speed_of[w] for w in words if w in speed_of), None)
    found["size"] = next((s for s in SIZES if s in ws), None)
    return found


def all_triples() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, MOTIONS))


def heldout_triples(fraction: float, seed: int) -> set[tuple[str, str, str]]:
    """Colour-shape-motion triples that never appear in training (compositional generalisation).

    Chosen so every colour, shape and motion still appears in training on its own.
    """
    triples = all_triples()
    rng = random.Random(seed + 7919)
    rng.shuffle(triples)
    n = int(round(fraction * len(triples)))
    held: set[tuple[str, str, str]] = set()
    for t in triples:
        if len(held) >= n:
            break
        held.add(t)
    return held
