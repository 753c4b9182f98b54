"""Vocabulary, palette and prompt metadata of the shapes world, shared by renderer, grammar and verifier.

One module owns every constant that two of the others must agree on (colour names and RGB values,
shape names, count words, relations, and the geometric meaning of a relation), so that the renderer
cannot draw something the verifier reads differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Saturated colours, far apart in RGB and along their blends with the background (the closest pair,
# orange-yellow, is 90 apart; every other pair is over 100). The verifier models every pixel as a blend
# alpha * colour + (1 - alpha) * BACKGROUND, which is exactly what anti-aliased edges are.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (240, 220, 0),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (140, 40, 180),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
MAX_COUNT = len(COUNT_WORDS)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
CATEGORIES: tuple[str, ...] = ("single", "colour_attr", "counting", "position")

# GenEval's position rule (geneval/evaluation/evaluate_images.py): the centre offset, shrunk on each
# axis by POSITION_SHRINK * (sum of the two extents), normalised by the raw offset length, must exceed
# RELATION_THRESHOLD along the relation's direction (i.e. the offset points within ~60 degrees of it).
POSITION_SHRINK = 0.1
RELATION_THRESHOLD = 0.5

# Unit direction of each relation in image coordinates (x right, y down): where A lies relative to B.
_RELATION_DIRECTION: dict[str, tuple[float, float]] = {
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}


def relation_strength(
    centre_a: tuple[float, float],
    centre_b: tuple[float, float],
    extent_a: tuple[float, float],
    extent_b: tuple[float, float],
    relation: str,
) -> float:
    """GenEval-style signed strength of "A <relation> B", in [-1, 1]; the relation holds above 0.5.

    Centres and extents (width, height) in any one unit. Shared by renderer (which demands a larger
    value, so that its scenes hold with margin) and verifier (which uses RELATION_THRESHOLD).
    """
    if relation not in _RELATION_DIRECTION:
        raise ValueError(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
    ox = centre_a[0] - centre_b[0]
    oy = centre_a[1] - centre_b[1]
    norm = (ox * ox + oy * oy) ** 0.5
    if norm < 1e-9:
        return 0.0
    rx = max(abs(ox) - POSITION_SHRINK * (extent_a[0] + extent_b[0]), 0.0) * (1.0 if ox >= 0 else -1.0)
    ry = max(abs(oy) - POSITION_SHRINK * (extent_a[1] + extent_b[1]), 0.0) * (1.0 if oy >= 0 else -1.0)
    dx, dy = _RELATION_DIRECTION[relation]
    return (rx * dx + ry * dy) / norm


def article(word: str) -> str:
    """'an' before a vowel sound ('an orange circle'), else 'a'."""
    return "an" if word[:1] in "aeiou" else "a"


def plural(shape: str) -> str:
    """Plural of a shape noun (all three are regular)."""
    return shape + "s"


@dataclass(frozen=True)
class ObjectSpec:
    """One requested kind of object: `count` objects of this shape and colour."""

    shape: str
    colour: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid shapes: {', '.join(SHAPES)}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; valid colours: {', '.join(COLOURS)}")
        if (
            not isinstance(self.count, int)
            or isinstance(self.count, bool)
            or not 1 <= self.count <= MAX_COUNT
        ):
            raise ValueError(f"count must be an int in 1..{MAX_COUNT}, got {self.count!r}")

    @property
    def kind(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class RelationSpec:
    """objects[a] <relation> objects[b], e.g. a=0, b=1, relation='left of'."""

    a: int
    b: int
    relation: str

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}; valid relations: {', '.join(RELATIONS)}")


@dataclass(frozen=True)
class PromptSpec:
    """Structured metadata of one prompt: what the verifier checks and the renderer draws."""

    category: str
    objects: tuple[ObjectSpec, ...]
    relation: RelationSpec | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; valid: {', '.join(CATEGORIES)}")
        n = len(self.objects)
        if n == 0:
            raise ValueError("a prompt needs at least one object")
        expected = {"single": 1, "counting": 1, "colour_attr": 2, "position": 2}[self.category]
        if n != expected:
            raise ValueError(f"category {self.category!r} takes {expected} object(s), got {n}")
        if self.category != "counting" and any(o.count != 1 for o in self.objects):
            raise ValueError(f"category {self.category!r} takes one object of each kind")
        if n == 2 and self.objects[0].kind == self.objects[1].kind:
            raise ValueError(
                f"the two objects must differ in colour or shape, got two {self.objects[0].kind}"
            )
        if (self.category == "position") != (self.relation is not None):
            raise ValueError("a relation is required for 'position' prompts and only for them")
        if self.relation is not None:
            r = self.relation
            if {r.a, r.b} != {0, 1}:
                raise ValueError(f"relation indices must be 0 and 1, got a={r.a}, b={r.b}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: {category, objects: [{shape, colour, count}], relation: None or {a, b, relation}}."""
        return {
            "category": self.category,
            "objects": [{"shape": o.shape, "colour": o.colour, "count": o.count} for o in self.objects],
            "relation": None
            if self.relation is None
            else {"a": self.relation.a, "b": self.relation.b, "relation": self.relation.relation},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptSpec:
        """Inverse of `to_dict`; also accepts 'color' for 'colour'."""
        try:
            objects = tuple(
                ObjectSpec(
                    shape=o["shape"], colour=o.get("colour", o.get("color")), count=int(o.get("count", 1))
                )
                for o in data["objects"]
            )
            rel = data.get("relation")
            relation = None if rel is None else RelationSpec(int(rel["a"]), int(rel["b"]), rel["relation"])
            return cls(category=data["category"], objects=objects, relation=relation)
        except KeyError as exc:
            raise ValueError(f"prompt metadata lacks key {exc.args[0]!r}: {dict(data)!r}") from None
