"""The shapes world seen through GenEval's rules: its prompts as GenEval metadata, its detector as a GenEval detector.

This is how the GenEval rules (``margrpo.rewards.geneval_rules``) are checked against the shapes verifier: both
read the same detections (``detection.detect_batch``), so where they disagree the rules differ, not the detectors
(``docs/findings/2026-12-07-geneval-rules-on-shapes.md`` measures it; ``python -m
margrpo.worlds.shapes.geneval_agreement`` reproduces it).

- A shape is a GenEval class; a prompt becomes GenEval metadata the way GenEval's own prompts are written:
  ``single`` -> tag ``colors``, one include item with ``color``; ``colour_attr`` -> ``color_attr``, two items;
  ``counting`` -> ``counting``, one item with its count and colour, and ``exclude`` at count + 1 (GenEval's
  counting prompts have no colour; the shapes world's do, so the item keeps it); ``position`` -> ``position``:
  the reference object B first, then A with ``position: [relation, 0]``.
- The detector has no confidence: every object scores 1.0 and the order is the detector's, largest first, so
  GenEval's "most confident" object of a class is its largest, as the verifier's relation check takes the
  largest. Boxes are the object's centroid +- half its core extent, so GenEval's position rule sees exactly the
  centres and extents the verifier's ``relation_strength`` sees. Colours come from the detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from margrpo.rewards.geneval_rules import DetectedObject

from .detection import Detection, detect_batch, to_work_array
from .spec import PromptSpec

__all__ = ["ShapesDetector", "geneval_metadata", "to_detected_objects"]

_TAGS = {"single": "colors", "colour_attr": "color_attr", "counting": "counting", "position": "position"}


def geneval_metadata(spec: PromptSpec, prompt: str = "") -> dict[str, Any]:
    """GenEval metadata for a shapes prompt (mapping in the module docstring)."""
    items = [{"class": o.shape, "count": o.count, "color": o.colour} for o in spec.objects]
    meta: dict[str, Any] = {"tag": _TAGS[spec.category], "prompt": prompt}
    if spec.relation is not None:
        r = spec.relation
        meta["include"] = [items[r.b], {**items[r.a], "position": [r.relation, 0]}]
    else:
        meta["include"] = items
    if spec.category == "counting":
        meta["exclude"] = [{"class": o.shape, "count": o.count + 1} for o in spec.objects]
    return meta


def to_detected_objects(detections: Sequence[Detection], size: tuple[int, int]) -> list[DetectedObject]:
    """Shapes detections (fractions of the canvas) as GenEval detections in pixels of a ``size`` = (W, H) image."""
    w, h = size
    out = []
    for d in detections:
        if d.shape == "other":  # a blob of no shape is no class GenEval could be asked about
            continue
        box = ((d.cx - d.width / 2) * w, (d.cy - d.height / 2) * h, (d.cx + d.width / 2) * w,
               (d.cy + d.height / 2) * h)
        out.append(DetectedObject(label=d.shape, box=box, score=1.0, colour=d.colour))
    return out


class ShapesDetector:
    """The shapes world's detector behind the ``ObjectDetector`` interface of ``margrpo.rewards.detectors``."""

    sees_colour = True

    def detect(self, images: Sequence[Image.Image], classes: Sequence[Sequence[str]], min_score: float
               ) -> list[list[DetectedObject]]:
        dets = detect_batch(to_work_array(list(images)))
        return [[o for o in to_detected_objects(d, im.size) if o.label in cls and o.score > min_score]
                for d, im, cls in zip(dets, images, classes, strict=True)]

    def to(self, device: str | torch.device) -> ShapesDetector:
        return self
