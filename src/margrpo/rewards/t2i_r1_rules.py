"""The T2I-R1 / MAR-GRPO detector reward's rules on phrase detections (no model: the rules alone).

Source: ``reward_gdino.py`` of CaraJ7/T2I-R1 (``src/t2i-r1/src/utils/``), copied unchanged into the MAR-GRPO release
(AMAP-ML/mar-grpo, ``src/grpo/src/utils/reward_gdino.py``). The detector is queried with the record's ``nouns``;
a noun is *found* on every box whose phrase probability exceeds ``BOX_THRESHOLD`` (0.3). The record's
``task_type`` picks the rule:

- ``spatial`` (with ``spatial_info: {obj1, obj2, locality}``): 0.2 for each of obj1 and obj2 found; if both are, each
  is represented by its most confident box ("duplicate suppression" by keeping the top box) and
  ``position / 2`` is added, so the best score is 0.9. ``position`` compares the box centres,
  ``dx = centre2.x - centre1.x``, ``dy = centre2.y - centre1.y`` (image y grows downwards), and the boxes' IoU:

  ============================================  ============================================================
  locality                                      position
  ============================================  ============================================================
  left of, on the left of                       ``dx > 0`` and ``|dx| > |dy|``: 1 if IoU < 0.1 else 0.1 / IoU
  right of, on the right of                     ``dx < 0`` and ``|dx| > |dy|``: likewise
  below, on the bottom of                       ``dy < 0`` and ``|dy| > |dx|``: likewise
  above, on top of, on the top of, top of       ``dy > 0`` and ``|dy| > |dx|``: likewise
  next to, near, on side of                     1
  anything else                                 0
  ============================================  ============================================================

- ``numeracy`` (with ``numeracy_info: [{obj_name, num}]``): per item, weight ``1 / len(items)``: 0 if obj_name is not
  found, else its boxes after non-maximum suppression at IoU 0.5 are counted: the weight if the count is ``num``,
  0.2 x the weight otherwise.
- any other task type: the fraction of ``nouns`` found. A record with no nouns scores 1.

Where this differs from the release, and why:

- ``above`` and ``on top of`` score like ``on the top of``. The release's ``determine_position`` has no branch for
  them, so the 364 ``above`` prompts among the 2,195 spatial prompts of its training file can never earn the
  position half: a bug, not a rule.
- ``next to`` / ``near`` / ``on side of``: the release tests ``|dx| < 150 or |dy| < 150`` on box coordinates
  normalised to [0, 1], which always holds; we write the rule it implements (1 when both are found).
- Duplicates are suppressed as the release does it: the top box per object for spatial prompts, non-maximum
  suppression at IoU 0.5 for counts. (Its file also defines an ``is_duplicate``, IoU or containment above 0.9,
  that nothing calls.) Our non-maximum suppression runs on corner boxes ``(x0, y0, x1, y1)``; the release passes
  Grounding DINO's centre boxes ``(cx, cy, w, h)`` to ``torchvision.ops.nms``, which reads them as corners, so its
  counts depend on where and how large the boxes are rather than on their overlap.
- A phrase's probability is the mean of the sigmoid token scores over all tokens of the noun. The release's
  ``make_prompt`` takes the span of the first and of the last word of a multi-word noun; the two agree for one-
  and two-word nouns (all but 4 of the file's 15,297 nouns).
- A phrase is matched by its position in ``nouns``, not by string equality with the decoded span, which in the
  release failed for nouns of three or more words (the span text is "first last").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .geneval_rules import DetectedObject

__all__ = [
    "BOX_THRESHOLD",
    "NEAR_LOCALITIES",
    "NMS_IOU",
    "nms",
    "numeracy_score",
    "object_score",
    "position_score",
    "score_record",
    "spatial_score",
]

BOX_THRESHOLD = 0.3
NMS_IOU = 0.5
IOU_THRESHOLD = 0.1
PRESENCE = 0.2  # per spatial object found
MISCOUNT = 0.2  # share of a numeracy item's weight for a wrong count

_LEFT = ("left of", "on the left of")
_RIGHT = ("right of", "on the right of")
_BELOW = ("below", "on the bottom of")
_ABOVE = ("above", "on top of", "on the top of", "top of")
NEAR_LOCALITIES = ("next to", "near", "on side of")

#: What a detector hands these rules: for each queried noun (in ``nouns`` order), its boxes above the threshold.
PhraseDetections = Sequence[Sequence[DetectedObject]]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of corner boxes in continuous coordinates (the release's ``determine_position`` and torchvision's nms)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(objects: Sequence[DetectedObject], iou: float = NMS_IOU) -> list[DetectedObject]:
    """Greedy non-maximum suppression (torchvision's rule): keep the most confident, drop boxes with IoU > iou."""
    order = sorted(objects, key=lambda o: -o.score)
    kept: list[DetectedObject] = []
    for o in order:
        if all(_iou(o.box, k.box) <= iou for k in kept):
            kept.append(o)
    return kept


def position_score(locality: str, box1: Sequence[float], box2: Sequence[float]) -> float:
    """How well box1 stands in ``locality`` to box2 (table in the module docstring), in [0, 1]."""
    loc = locality.strip().lower()
    if loc in NEAR_LOCALITIES:
        return 1.0
    c1 = ((box1[0] + box1[2]) / 2, (box1[1] + box1[3]) / 2)
    c2 = ((box2[0] + box2[2]) / 2, (box2[1] + box2[3]) / 2)
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    if loc in _LEFT:
        ok = dx > 0 and abs(dx) > abs(dy)
    elif loc in _RIGHT:
        ok = dx < 0 and abs(dx) > abs(dy)
    elif loc in _BELOW:
        ok = dy < 0 and abs(dy) > abs(dx)
    elif loc in _ABOVE:
        ok = dy > 0 and abs(dy) > abs(dx)
    else:
        return 0.0
    if not ok:
        return 0.0
    iou = _iou(box1, box2)
    return 1.0 if iou < IOU_THRESHOLD else IOU_THRESHOLD / iou


def object_score(found: PhraseDetections, nouns: Sequence[str]) -> float:
    """Fraction of nouns with at least one box."""
    if not nouns:
        return 1.0
    return sum(1 for boxes in found if boxes) / len(nouns)


def _top(boxes: Sequence[DetectedObject]) -> DetectedObject:
    return max(boxes, key=lambda o: o.score)


def spatial_score(found: PhraseDetections, nouns: Sequence[str], spatial_info: Mapping[str, Any]) -> float:
    """0.2 per object found, plus half the position score of their most confident boxes when both are."""
    boxes = []
    for key in ("obj1", "obj2"):
        name = spatial_info[key]
        hits = [found[i] for i, n in enumerate(nouns) if n == name and found[i]]
        boxes.append(hits[0] if hits else [])
    score = PRESENCE * sum(1 for b in boxes if b)
    if all(boxes):
        score += position_score(str(spatial_info["locality"]), _top(boxes[0]).box, _top(boxes[1]).box) / 2
    return score


def numeracy_score(found: PhraseDetections, nouns: Sequence[str], numeracy_info: Sequence[Mapping[str, Any]]
                   ) -> float:
    """Per item: its weight if the boxes left after NMS number ``num``, a fifth of it if not, 0 if none."""
    if not numeracy_info:
        return 0.0
    weight = 1.0 / len(numeracy_info)
    score = 0.0
    for item in numeracy_info:
        boxes = [o for i, n in enumerate(nouns) if n == item["obj_name"] for o in found[i]]
        if not boxes:
            continue
        score += weight if len(nms(boxes)) == int(item["num"]) else MISCOUNT * weight
    return score


def score_record(found: PhraseDetections, metadata: Mapping[str, Any]) -> float:
    """The reward of one image whose ``nouns`` (from ``metadata``) were detected as ``found``."""
    nouns = list(metadata.get("nouns") or [])
    if len(found) != len(nouns):
        raise ValueError(f"got detections for {len(found)} phrases but the record has {len(nouns)} nouns")
    if not nouns:
        return 1.0
    task = metadata.get("task_type")
    if task == "spatial":
        info = metadata.get("spatial_info")
        if not isinstance(info, Mapping) or not {"obj1", "obj2", "locality"} <= set(info):
            raise ValueError(f"a 'spatial' record needs spatial_info {{obj1, obj2, locality}}, got {info!r}")
        return spatial_score(found, nouns, info)
    if task == "numeracy":
        info = metadata.get("numeracy_info")
        if not isinstance(info, list):
            raise ValueError(f"a 'numeracy' record needs numeracy_info [{{obj_name, num}}], got {info!r}")
        return numeracy_score(found, nouns, info)
    return object_score(found, nouns)
