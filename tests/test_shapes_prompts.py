"""Prompt grammar of the shapes world: canonical round trip, liberal parsing, errors, held-out split."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from margrpo.worlds import shapes
from margrpo.worlds.shapes.prompts import (
    CATEGORIES,
    DEMO_PROMPTS,
    HELDOUT_KINDS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    all_prompts,
    format_prompt,
    heldout_prompts,
    is_heldout,
    parse_prompt,
    sample_train_prompt,
    train_prompts,
)
from margrpo.worlds.shapes.spec import INVERSE_RELATION, RELATIONS, ObjectSpec, PromptSpec, RelationSpec

SIZES = {"single": 18, "colour_attr": 180, "counting": 72, "position": 1224}
HELDOUT_SIZES = {"single": 3, "colour_attr": 24, "counting": 12, "position": 284}


def test_prompt_space_sizes_and_uniqueness() -> None:
    for cat, n in SIZES.items():
        ps = all_prompts(cat)
        assert len(ps) == n
        assert len(set(ps)) == n
    assert len(all_prompts()) == sum(SIZES.values())


def test_every_prompt_round_trips_exactly() -> None:
    for cat in CATEGORIES:
        for p in all_prompts(cat):
            spec = parse_prompt(p)
            assert spec.category == cat
            assert format_prompt(spec) == p
            assert PromptSpec.from_dict(spec.to_dict()) == spec


def test_canonical_examples() -> None:
    assert format_prompt(PromptSpec("single", (ObjectSpec("triangle", "green"),))) == "a green triangle"
    assert format_prompt(PromptSpec("single", (ObjectSpec("circle", "orange"),))) == "an orange circle"
    assert (
        format_prompt(PromptSpec("counting", (ObjectSpec("circle", "yellow", 3),))) == "three yellow circles"
    )
    assert format_prompt(PromptSpec("counting", (ObjectSpec("square", "red", 1),))) == "one red square"
    two = (ObjectSpec("square", "blue"), ObjectSpec("circle", "red"))
    assert format_prompt(PromptSpec("colour_attr", two)) == "a blue square and a red circle"
    pos = PromptSpec("position", two, RelationSpec(0, 1, "left of"))
    assert format_prompt(pos) == "a blue square left of a red circle"
    assert pos.to_dict() == {
        "category": "position",
        "objects": [
            {"shape": "square", "colour": "blue", "count": 1},
            {"shape": "circle", "colour": "red", "count": 1},
        ],
        "relation": {"a": 0, "b": 1, "relation": "left of"},
    }


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("A Red Circle.", "a red circle"),
        ("an red circle", "a red circle"),
        ("a orange square", "an orange square"),
        ("two red circle", "two red circles"),
        ("one red squares", "one red square"),
        ("a photo of a blue triangle", "a blue triangle"),
        ("a red circle to the left of a blue square", "a red circle left of a blue square"),
        ("a red circle on the right of a blue square", "a red circle right of a blue square"),
        ("  a green   circle   above a red   square ", "a green circle above a red square"),
    ],
)
def test_parser_is_liberal_where_cheap(text: str, canonical: str) -> None:
    assert format_prompt(parse_prompt(text)) == canonical


@pytest.mark.parametrize(
    ("text", "must_mention"),
    [
        ("a pink circle", ["'pink'", "red", "purple"]),
        ("a red hexagon", ["'hexagon'", "circle", "triangle"]),
        ("five red circles", ["'five'", "one", "four"]),
        ("a red circle near a blue square", ["'near'", "left of", "below", "and"]),
        ("a red circle and", ["ends", "a, an"]),
        ("red circle", ["'red'", "a, an"]),
        ("", ["empty"]),
        ("two red circles left of a blue square", ["'left of'", "<end of prompt>"]),
        ("a red circle left of a blue square please", ["'please'"]),
    ],
)
def test_parser_errors_name_the_word_and_the_valid_words(text: str, must_mention: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        parse_prompt(text)
    msg = str(err.value)
    for m in must_mention:
        assert m in msg, (m, msg)


def test_parser_rejects_two_identical_objects() -> None:
    with pytest.raises(ValueError, match="differ"):
        parse_prompt("a red circle and a red circle")
    with pytest.raises(ValueError, match="string"):
        parse_prompt(3)  # type: ignore[arg-type]


def test_split_partitions_the_space_with_documented_sizes() -> None:
    for cat in CATEGORIES:
        train, held = set(train_prompts(cat)), set(heldout_prompts(cat))
        assert not train & held
        assert train | held == set(all_prompts(cat))
        assert len(held) == HELDOUT_SIZES[cat]
        assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)
    assert len(heldout_prompts()) == sum(HELDOUT_SIZES.values())


def test_every_heldout_word_and_kind_occurs_in_training() -> None:
    train = train_prompts()
    train_words = {w for p in train for w in p.split()}
    held_words = {w for p in heldout_prompts() for w in p.split()}
    assert held_words <= train_words
    train_kinds = {o.kind for p in train for o in parse_prompt(p).objects}
    assert len(train_kinds) == 18  # every colour-shape pair is seen
    counts_per_kind = Counter(o.kind for p in train_prompts("counting") for o in parse_prompt(p).objects)
    assert min(counts_per_kind.values()) >= 3
    # the held-out single kinds are seen in company: next to other objects, in every relation
    for cat in ("colour_attr", "position"):
        in_company = {o.kind for p in train_prompts(cat) for o in parse_prompt(p).objects}
        assert HELDOUT_KINDS <= in_company, cat
    relations = {(o.kind, parse_prompt(p).relation.relation) for p in train_prompts("position")
                 for o in parse_prompt(p).objects[:1]}
    assert {(k, r) for k in HELDOUT_KINDS for r in RELATIONS} <= relations


def test_heldout_combinations_never_occur_in_training() -> None:
    for p in train_prompts():
        spec = parse_prompt(p)
        kinds = [o.kind for o in spec.objects]
        if spec.category in ("colour_attr", "position"):
            assert frozenset(kinds) not in HELDOUT_PAIRS, p
        if spec.category == "single":
            assert kinds[0] not in HELDOUT_KINDS
        if spec.category == "counting":
            o = spec.objects[0]
            assert not (o.kind in HELDOUT_KINDS and o.count == 1)
        if spec.relation is not None:
            r = spec.relation
            a, b = spec.objects[r.a], spec.objects[r.b]
            assert (a.colour, a.shape, r.relation) not in HELDOUT_RELATIONS, p
            assert (b.colour, b.shape, INVERSE_RELATION[r.relation]) not in HELDOUT_RELATIONS, p


def test_demo_prompts_are_heldout_and_mixed() -> None:
    assert len(DEMO_PROMPTS) == 8
    cats = Counter(parse_prompt(p).category for p in DEMO_PROMPTS)
    assert set(cats) == set(CATEGORIES)
    for p in DEMO_PROMPTS:
        assert is_heldout(p)
        assert format_prompt(parse_prompt(p)) == p


def test_sample_train_prompt_is_deterministic_balanced_and_train_only() -> None:
    a = [sample_train_prompt(np.random.default_rng(11)) for _ in range(3)]
    b = [sample_train_prompt(np.random.default_rng(11)) for _ in range(3)]
    assert a == b
    rng = np.random.default_rng(12)
    drawn = [sample_train_prompt(rng) for _ in range(2000)]
    train = set(train_prompts())
    assert all(p in train for p in drawn)
    cats = Counter(parse_prompt(p).category for p in drawn)
    for cat in CATEGORIES:
        assert 400 < cats[cat] < 600  # 500 expected per category
    assert all(parse_prompt(sample_train_prompt(rng, "counting")).category == "counting" for _ in range(20))


def test_unknown_category_is_an_error() -> None:
    with pytest.raises(ValueError, match="valid: single, colour_attr, counting, position"):
        train_prompts("colors")


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="count must be"):
        ObjectSpec("circle", "red", 5)
    with pytest.raises(ValueError, match="takes 2 object"):
        PromptSpec("position", (ObjectSpec("circle", "red"),), RelationSpec(0, 1, "above"))
    with pytest.raises(ValueError, match="relation is required"):
        PromptSpec("position", (ObjectSpec("circle", "red"), ObjectSpec("square", "red")))
    with pytest.raises(ValueError, match="lacks key 'objects'"):
        PromptSpec.from_dict({"category": "single"})
    assert shapes.parse_prompt is parse_prompt
