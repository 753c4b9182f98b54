"""GenEval's scoring rules on the detections of any detector (no model, no mmdet: numpy and the standard library).

GenEval (djghosh13/geneval, ``evaluation/evaluate_images.py``) scores an image against metadata
``{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, index]}], "exclude"?: [{"class",
"count"}]}`` in two stages; both are here, apart from the detector that feeds them:

1. **Which detections count** (:func:`keep_objects`): per class, detections ordered by score (most confident
   first), those above ``threshold`` (0.3; 0.9 for the ``counting`` tag), at most ``max_objects`` (16), then
   greedy suppression of boxes whose IoU with a kept one is ``>= max_overlap`` (1.0, i.e. none, by default).
   IoU uses GenEval's pixel convention (``x1 - x0 + 1``), so boxes are in pixels.
2. **The rules** on those objects (:func:`evaluate`), three readings of the same checks:

   - ``correct``: GenEval's ``evaluate()``. Every include item needs at least ``count`` objects of its class; its
     ``count`` most confident ones must all have ``color`` if one is named (colours as a detector or a CLIP
     classifier sees them); with ``position: [rel, j]`` each of them must stand in ``rel`` to each object matched
     for item ``j`` (which must itself have matched). An exclude item fails with ``count`` or more objects.
   - ``exact``: Flow-GRPO's ``strict_correct`` (yifan123/reward-server ``reward_server/gen_eval.py``, vendored in
     the MAR-GRPO release at ``src/grpo/src/utils/reward-server``): the same but the count must be exactly
     ``count`` (excludes are not read).
   - ``score``: Flow-GRPO's training reward, the mean of per-item terms: ``1 - |count - found| / count`` per item
     (not clipped: three objects for a count of one give -1), then, where colour or position is asked, 0 if the
     count was wrong, else ``1 - |count - n_colour| / count`` for colour and 1 or 0 for position. Flow-GRPO
     appends the position term 1 even after a failed position check (its ``rewards.append(1.0)`` sits after
     the loop), so a failed position adds the two terms 0 and 1; we keep that, since it is the reward the
     release trained on, and say so here.

Position (``relative_position``): A's box centre minus B's, each axis shrunk towards 0 by ``position_margin``
(GenEval's ``c = 0.1``) times the sum of the two boxes' extents on that axis, divided by the length of the raw
offset; ``left of`` if the x part is below -0.5, ``right of`` above 0.5, ``above``/``below`` likewise on y (image
y grows downwards). A pair whose shrunk offset is under 1e-3 on both axes has no relation.

Colour: GenEval classifies each object's crop (box, with the mask composited on grey ``#999`` where there is
one) by zero-shot CLIP over :data:`COLOURS`. Here an object carries its colour in ``DetectedObject.colour``;
:func:`colour_requests` lists the objects whose colour the rules read (the ``count`` most confident objects of an
include item with ``color``) so that a reward can classify all of a batch's crops in one pass and fill them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "COLOURS",
    "DetectedObject",
    "GenevalResult",
    "GenevalRules",
    "box_iou",
    "colour_requests",
    "evaluate",
    "keep_objects",
    "relative_position",
]

#: GenEval's colour vocabulary (the classes of its CLIP colour classifier), in its order.
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class DetectedObject:
    """One detection, as a detector hands it to the rules.

    Attributes:
        label: the class, spelled as the metadata's ``class`` (``"wine glass"``, ``"circle"``).
        box: ``(x0, y0, x1, y1)`` in pixels of the scored image.
        score: the detector's confidence in [0, 1] (orders objects: "most confident first").
        colour: the object's colour where known (a detector that sees colours, or filled in by a classifier).
        mask: optional bool ``[H, W]`` mask (GenEval composites it over grey before classifying colour).
    """

    label: str
    box: tuple[float, float, float, float]
    score: float
    colour: str | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenevalRules:
    """GenEval's thresholds, defaults as its ``evaluate_images.py`` (and Flow-GRPO's reward server) set them."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0  # GenEval's NMS_THRESHOLD: IoU at which a less confident box is dropped; 1 = never
    position_margin: float = 0.1  # GenEval's POSITION_THRESHOLD (c)

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "max_overlap"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"GenevalRules.{name} must be in [0, 1], got {v!r}")
        if self.max_objects < 1:
            raise ValueError(f"GenevalRules.max_objects must be >= 1, got {self.max_objects!r}")
        if self.position_margin < 0:
            raise ValueError(f"GenevalRules.position_margin must be >= 0, got {self.position_margin!r}")

    def confidence_threshold(self, tag: str | None) -> float:
        return self.counting_threshold if tag == "counting" else self.threshold


@dataclass
class GenevalResult:
    """The three readings of one image (see the module docstring) and GenEval's reasons for ``correct``."""

    correct: bool
    exact: bool
    score: float
    reasons: list[str]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """GenEval's ``compute_iou``: pixel boxes, inclusive ends (``+ 1``)."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0) * max(y1 - y0 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def keep_objects(objects: Iterable[DetectedObject], tag: str | None,
                 rules: GenevalRules = GenevalRules()) -> dict[str, list[DetectedObject]]:
    """Per class, the detections GenEval keeps, most confident first (stage 1 of the module docstring).

    Ties in score keep the detector's order (a stable sort), so a detector without confidences (all 1.0) decides
    the order itself.
    """
    threshold = rules.confidence_threshold(tag)
    by_class: dict[str, list[DetectedObject]] = {}
    for o in objects:
        by_class.setdefault(o.label, []).append(o)
    kept: dict[str, list[DetectedObject]] = {}
    for label, objs in by_class.items():
        order = sorted(objs, key=lambda o: -o.score)
        order = [o for o in order if o.score > threshold][: rules.max_objects]
        out: list[DetectedObject] = []
        while order:
            best = order.pop(0)
            out.append(best)
            if rules.max_overlap < 1.0:
                order = [o for o in order if box_iou(best.box, o.box) < rules.max_overlap]
        if out:
            kept[label] = out
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """The relations in which A stands to B under GenEval's rule (module docstring)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def _items(metadata: Mapping[str, Any], key: str, required: bool) -> list[Mapping[str, Any]]:
    """The include/exclude list, checked: one error naming the key and what is valid."""
    if key not in metadata:
        if required:
            raise ValueError(f"GenEval metadata lacks {key!r} (keys: {sorted(metadata)}); expected "
                             "{'tag', 'include': [{'class', 'count', 'color'?, 'position'?}], 'exclude'?}")
        return []
    items = metadata[key]
    if not isinstance(items, list) or (required and not items):
        raise ValueError(f"GenEval metadata {key!r} must be a non-empty list of objects, got {items!r}")
    for i, it in enumerate(items):
        if not isinstance(it, Mapping) or not isinstance(it.get("class"), str):
            raise ValueError(f"GenEval metadata {key}[{i}] must be an object with a 'class' string, got {it!r}")
        count = it.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"GenEval metadata {key}[{i}]['count'] must be an integer >= 1, got {count!r}")
        if key == "include" and "position" in it and it["position"] is not None:
            pos = it["position"]
            ok = (isinstance(pos, list | tuple) and len(pos) == 2 and pos[0] in RELATIONS
                  and isinstance(pos[1], int) and 0 <= pos[1] < i)
            if not ok:
                raise ValueError(f"GenEval metadata include[{i}]['position'] must be [relation, index of an earlier "
                                 f"item] with relation in {RELATIONS}, got {pos!r}")
    return list(items)


def colour_requests(kept: Mapping[str, Sequence[DetectedObject]], metadata: Mapping[str, Any]
                    ) -> list[tuple[str, int]]:
    """``(class, index)`` of every kept object whose colour the rules will read (a class is listed once)."""
    out: list[tuple[str, int]] = []
    for it in _items(metadata, "include", required=True):
        if "color" in it:
            cls = it["class"]
            out += [(cls, k) for k in range(min(it["count"], len(kept.get(cls, ()))))
                    if (cls, k) not in out]
    return out


def _colours(objs: Sequence[DetectedObject], classname: str) -> list[str]:
    cols = [o.colour for o in objs]
    if any(c is None for c in cols):
        raise ValueError(f"a colour check on {classname!r} needs each object's colour; the detector gave none "
                         "(fill DetectedObject.colour, e.g. with a CLIP colour classifier)")
    return [str(c) for c in cols]


def _position_holds(objs: Sequence[DetectedObject], targets: Sequence[DetectedObject], relation: str,
                    margin: float) -> tuple[bool, set[str]]:
    for o in objs:
        for t in targets:
            rels = relative_position(o.box, t.box, margin)
            if relation not in rels:
                return False, rels
    return True, set()


def _correct(kept: Mapping[str, Sequence[DetectedObject]], metadata: Mapping[str, Any], margin: float
             ) -> tuple[bool, list[str]]:
    """GenEval's ``evaluate()``: at least ``count``, colour and position on the most confident ``count``."""
    correct, reasons = True, []
    matched: list[Sequence[DetectedObject] | None] = []
    for it in _items(metadata, "include", required=True):
        cls, n = it["class"], it["count"]
        ok = True
        found = list(kept.get(cls, ()))[:n]
        if len(found) < n:
            ok = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in it:
                colours = _colours(found, cls)
                if colours.count(it["color"]) < n:
                    ok = False
                    reasons.append(f"expected {it['color']} {cls}>={n}, found {colours.count(it['color'])} "
                                   f"{it['color']}; colours {colours}")
            if it.get("position") is not None and ok:
                rel, j = it["position"]
                if matched[j] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    holds, seen = _position_holds(found, matched[j], rel, margin)
                    if not holds:
                        ok = False
                        reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(seen))} target")
        correct &= ok
        matched.append(found if ok else None)
    for it in _items(metadata, "exclude", required=False):
        n_found = len(kept.get(it["class"], ()))
        if n_found >= it["count"]:
            correct = False
            reasons.append(f"expected {it['class']}<{it['count']}, found {n_found}")
    return correct, reasons


def _flow_grpo(kept: Mapping[str, Sequence[DetectedObject]], metadata: Mapping[str, Any], margin: float
               ) -> tuple[bool, float]:
    """Flow-GRPO's ``evaluate_reward()``: exact counts; returns (strict_correct, partial score)."""
    exact = True
    terms: list[float] = []
    matched: list[Sequence[DetectedObject] | None] = []
    for it in _items(metadata, "include", required=True):
        cls, n = it["class"], it["count"]
        ok = True
        found = list(kept.get(cls, ()))
        terms.append(1.0 - abs(n - len(found)) / n)
        if len(found) != n:
            ok = False
            if "color" in it or "position" in it:
                terms.append(0.0)
        else:
            if "color" in it:
                n_colour = _colours(found, cls).count(it["color"])
                terms.append(1.0 - abs(n - n_colour) / n)
                ok = n_colour == n
            if it.get("position") is not None and ok:
                rel, j = it["position"]
                if matched[j] is None:
                    ok = False
                    terms.append(0.0)
                else:
                    holds, _ = _position_holds(found, matched[j], rel, margin)
                    if not holds:
                        ok = False
                        terms.append(0.0)
                    terms.append(1.0)  # Flow-GRPO appends this after the loop, failed or not (module docstring)
        exact &= ok
        matched.append(found if ok else None)
    return exact, (sum(terms) / len(terms) if terms else 0.0)


def evaluate(kept: Mapping[str, Sequence[DetectedObject]], metadata: Mapping[str, Any],
             rules: GenevalRules = GenevalRules()) -> GenevalResult:
    """Score one image's kept objects (:func:`keep_objects`) against its GenEval metadata."""
    correct, reasons = _correct(kept, metadata, rules.position_margin)
    exact, score = _flow_grpo(kept, metadata, rules.position_margin)
    return GenevalResult(correct=correct, exact=exact, score=float(score), reasons=reasons)
