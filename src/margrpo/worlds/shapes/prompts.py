"""Prompt grammar of the shapes world: generation, exact parsing, enumeration and the held-out split.

Categories (GenEval kinds) and their canonical text:

    single       "a green triangle", "an orange circle"
    colour_attr  "a red square and a blue circle"      (two objects, different colours and shapes)
    counting     "one red square", "three yellow circles"   (1..4, count words, natural plural)
    position     "a blue square left of a red circle"  (left of, right of, above, below; kinds differ)

Full space: 18 single, 180 colour_attr, 72 counting, 1224 position prompts (1494 in all).

Held-out split: combinations pretraining never sees, each made of parts it does see (every word,
every colour-shape kind, every relation). With colour index ci in (red, orange, yellow, green, blue,
purple), shape index si in (circle, square, triangle) and kind index k = 3 ci + si (0..17):

- HELDOUT_KINDS: the kinds with ci + si = 5 (mod 6): purple circle, blue square, green triangle. They
  are never drawn alone (no single prompt, no count one) in training, but occur there next to other
  objects and at counts 2..4: "a blue square" asks for a kind seen only in company.
- single: held out iff its kind is in HELDOUT_KINDS (3 of 18).
- counting: held out iff (ci + si + count) = 0 (mod 6): 12 of 72 (count, colour, shape) triples, 3 per
  count word; every kind keeps at least three counts in training, and the HELDOUT_KINDS lose exactly
  count one.
- HELDOUT_PAIRS: unordered pairs of kinds with k1 + k2 = 0 (mod 7) never appear together in training,
  in any category or relation.
- colour_attr: held out iff its two kinds form a HELDOUT_PAIR (24 of 180).
- position: held out iff its kinds form a HELDOUT_PAIR, or the prompt puts a kind in a relation listed
  in HELDOUT_RELATIONS, read both ways ("A left of B" is "B right of A"): 284 of 1224.

Held out in all: 323 of 1494 prompts. (An earlier split also kept the HELDOUT_KINDS out of every
multi-object training prompt; a 2.7M-parameter base then drew them as some other kind, and held-out
accuracy measured that gap rather than composition.)

Training sampling (`sample_train_prompt`) is category-balanced so that the 1224-prompt position
category does not drown the 15-prompt single one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache

import numpy as np

from .spec import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    INVERSE_RELATION,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    RelationSpec,
    article,
    plural,
)

__all__ = [
    "CATEGORIES",
    "DEMO_PROMPTS",
    "HELDOUT_KINDS",
    "HELDOUT_PAIRS",
    "HELDOUT_RELATIONS",
    "all_prompts",
    "format_prompt",
    "heldout_prompts",
    "is_heldout",
    "parse_prompt",
    "sample_train_prompt",
    "train_prompts",
]

HELDOUT_KINDS: frozenset[tuple[str, str]] = frozenset(
    (c, s) for ci, c in enumerate(COLOURS) for si, s in enumerate(SHAPES) if (ci + si) % 6 == 5
)
# Unordered pairs of kinds that never meet in a training prompt.
HELDOUT_PAIRS: frozenset[frozenset[tuple[str, str]]] = frozenset(
    frozenset({(COLOURS[k1 // 3], SHAPES[k1 % 3]), (COLOURS[k2 // 3], SHAPES[k2 % 3])})
    for k1 in range(18) for k2 in range(k1 + 1, 18) if (k1 + k2) % 7 == 0
)
# (colour, shape, relation): the kind never stands in this relation to anything in training.
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "square", "left of"),
        ("orange", "circle", "above"),
        ("yellow", "triangle", "right of"),
        ("green", "circle", "below"),
    }
)

# Fixed prompts for sample grids: all held out, two per category.
DEMO_PROMPTS: tuple[str, ...] = (
    "a purple circle",
    "a green triangle",
    "a red circle and a yellow square",
    "a blue square and a purple circle",
    "one blue square",
    "four yellow circles",
    "a red square left of a yellow circle",
    "a green circle below a blue triangle",
)

# ---------------------------------------------------------------------------------------------------
# Formatting


def _object_phrase(obj: ObjectSpec, counted: bool) -> str:
    if counted:
        noun = obj.shape if obj.count == 1 else plural(obj.shape)
        return f"{COUNT_WORDS[obj.count - 1]} {obj.colour} {noun}"
    return f"{article(obj.colour)} {obj.colour} {obj.shape}"


def format_prompt(spec: PromptSpec) -> str:
    """Canonical text of a prompt; `parse_prompt(format_prompt(s)) == s` for every valid spec."""
    if spec.category == "counting":
        return _object_phrase(spec.objects[0], counted=True)
    if spec.category == "single":
        return _object_phrase(spec.objects[0], counted=False)
    if spec.category == "colour_attr":
        a, b = spec.objects
        return f"{_object_phrase(a, False)} and {_object_phrase(b, False)}"
    rel = spec.relation
    assert rel is not None
    a, b = spec.objects[rel.a], spec.objects[rel.b]
    return f"{_object_phrase(a, False)} {rel.relation} {_object_phrase(b, False)}"


# ---------------------------------------------------------------------------------------------------
# Parsing

_PREFIX = re.compile(r"^(?:a|an)\s+(?:photo|image|picture)\s+of\s+")
# Longer relation phrasings first; each maps to a single token so that the tokenizer stays trivial.
_RELATION_PHRASES: tuple[tuple[str, str], ...] = (
    (r"\b(?:to|on)\s+the\s+left\s+of\b", "left_of"),
    (r"\b(?:to|on)\s+the\s+right\s+of\b", "right_of"),
    (r"\bleft\s+of\b", "left_of"),
    (r"\bright\s+of\b", "right_of"),
)
_RELATION_TOKENS: dict[str, str] = {
    "left_of": "left of",
    "right_of": "right of",
    "above": "above",
    "below": "below",
}
_ARTICLES = ("a", "an")
_SHAPE_WORDS: dict[str, str] = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}


def _show(word: str | None) -> str:
    """A word as the user wrote it (relation tokens back to their phrase)."""
    return "<end of prompt>" if word is None else _RELATION_TOKENS.get(word, word)


def _valid_words() -> str:
    return (
        f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)} (or plural); "
        f"counts: {', '.join(COUNT_WORDS)}; articles: a, an; relations: {', '.join(RELATIONS)}; "
        "joiner: and"
    )


class _Tokens:
    """Cursor over the normalised words of one prompt, producing errors that name the bad word."""

    def __init__(self, text: str) -> None:
        self.text = text
        norm = " ".join(text.strip().lower().rstrip(".").split())
        norm = _PREFIX.sub("", norm)
        for pattern, token in _RELATION_PHRASES:
            norm = re.sub(pattern, token, norm)
        self.words = norm.split()
        self.pos = 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self, what: str, valid: Sequence[str]) -> str:
        word = self.peek()
        if word is None:
            raise self.error(f"prompt ends where {what} was expected", valid)
        if word not in valid:
            raise self.error(
                f"unexpected word {_show(word)!r} (word {self.pos + 1}) where {what} was expected", valid
            )
        self.pos += 1
        return word

    def error(self, message: str, valid: Sequence[str]) -> ValueError:
        shown = ", ".join(_show(v) for v in valid)
        return ValueError(
            f"{message} in prompt {self.text!r}; valid here: {shown}. Grammar words: {_valid_words()}"
        )


def _parse_object(tok: _Tokens, counted: bool) -> ObjectSpec:
    if counted:
        count = COUNT_WORDS.index(tok.take("a count word", COUNT_WORDS)) + 1
    else:
        tok.take("an article", _ARTICLES)
        count = 1
    colour = tok.take("a colour", COLOURS)
    shape = _SHAPE_WORDS[tok.take("a shape", tuple(_SHAPE_WORDS))]
    return ObjectSpec(shape=shape, colour=colour, count=count)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the shapes grammar into its metadata; exact inverse of `format_prompt`.

    Liberal where it costs nothing: case, a trailing period, 'a'/'an' either way, singular or plural
    nouns, a leading 'a photo of', 'to the left of' / 'on the right of'. Anything else raises
    ValueError naming the offending word and listing the valid words.
    """
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
    tok = _Tokens(text)
    first = tok.peek()
    if first is None:
        raise tok.error("empty prompt", list(_ARTICLES) + list(COUNT_WORDS))
    if first in COUNT_WORDS:
        obj = _parse_object(tok, counted=True)
        if tok.peek() is not None:
            raise tok.error(
                f"unexpected word {_show(tok.peek())!r} after a counted object", ["<end of prompt>"]
            )
        return PromptSpec("counting", (obj,))
    if first not in _ARTICLES:
        raise tok.error(f"unexpected first word {_show(first)!r}", list(_ARTICLES) + list(COUNT_WORDS))
    a = _parse_object(tok, counted=False)
    nxt = tok.peek()
    if nxt is None:
        return PromptSpec("single", (a,))
    joiners = ["and", *_RELATION_TOKENS]
    if nxt not in joiners:
        raise tok.error(
            f"unexpected word {_show(nxt)!r} (word {tok.pos + 1}) after the first object",
            [*joiners, "<end of prompt>"],
        )
    word = tok.take("'and' or a relation", joiners)
    b = _parse_object(tok, counted=False)
    if tok.peek() is not None:
        raise tok.error(f"unexpected word {_show(tok.peek())!r} after the second object", ["<end of prompt>"])
    if word == "and":
        return PromptSpec("colour_attr", (a, b))
    return PromptSpec("position", (a, b), RelationSpec(0, 1, _RELATION_TOKENS[word]))


# ---------------------------------------------------------------------------------------------------
# Enumeration and split


def _kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def _enumerate(category: str) -> list[PromptSpec]:
    kinds = _kinds()
    if category == "single":
        return [PromptSpec("single", (ObjectSpec(s, c),)) for c, s in kinds]
    if category == "counting":
        return [PromptSpec("counting", (ObjectSpec(s, c, n),)) for n in range(1, 5) for c, s in kinds]
    if category == "colour_attr":
        return [
            PromptSpec("colour_attr", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)))
            for c1, s1 in kinds
            for c2, s2 in kinds
            if c1 != c2 and s1 != s2
        ]
    if category == "position":
        return [
            PromptSpec("position", (ObjectSpec(s1, c1), ObjectSpec(s2, c2)), RelationSpec(0, 1, r))
            for c1, s1 in kinds
            for r in RELATIONS
            for c2, s2 in kinds
            if (c1, s1) != (c2, s2)
        ]
    raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")


def is_heldout(spec: PromptSpec | str) -> bool:
    """Whether a prompt belongs to the held-out split (rule in the module docstring)."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    kinds = [o.kind for o in spec.objects]
    if spec.category == "single":
        return kinds[0] in HELDOUT_KINDS
    if spec.category == "counting":
        o = spec.objects[0]
        return (COLOURS.index(o.colour) + SHAPES.index(o.shape) + o.count) % 6 == 0
    if frozenset(kinds) in HELDOUT_PAIRS:
        return True
    if spec.category == "position":
        rel = spec.relation
        assert rel is not None
        a, b = spec.objects[rel.a], spec.objects[rel.b]
        return (a.colour, a.shape, rel.relation) in HELDOUT_RELATIONS or (
            b.colour,
            b.shape,
            INVERSE_RELATION[rel.relation],
        ) in HELDOUT_RELATIONS
    return False


@cache
def _split(category: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    train: list[str] = []
    held: list[str] = []
    for spec in _enumerate(category):
        (held if is_heldout(spec) else train).append(format_prompt(spec))
    return tuple(train), tuple(held)


def _categories(category: str | None) -> tuple[str, ...]:
    if category is None:
        return CATEGORIES
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    return (category,)


def all_prompts(category: str | None = None) -> list[str]:
    """Every prompt of the grammar (canonical text), in a fixed order."""
    return [p for c in _categories(category) for p in _split(c)[0] + _split(c)[1]]


def train_prompts(category: str | None = None) -> list[str]:
    """Prompts pretraining and RL may use, in a fixed order."""
    return [p for c in _categories(category) for p in _split(c)[0]]


def heldout_prompts(category: str | None = None) -> list[str]:
    """Prompts kept out of training, for measuring generalisation, in a fixed order."""
    return [p for c in _categories(category) for p in _split(c)[1]]


def sample_train_prompt(rng: np.random.Generator, category: str | None = None) -> str:
    """One training prompt: a category uniformly (unless given), then a prompt of it uniformly."""
    cats = _categories(category)
    cat = cats[int(rng.integers(len(cats)))]
    pool = _split(cat)[0]
    return pool[int(rng.integers(len(pool)))]
