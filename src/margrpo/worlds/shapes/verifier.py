"""GenEval-style scoring of images against shapes-world prompts: `strict` (bool) and `partial` ([0, 1]).

Checks, for a prompt asking for objects i = (colour c_i, shape s_i, count n_i):

    count[i]   1 - |found_i - n_i| / n_i, clipped to [0, 1]; found_i = detected objects of colour c_i
               AND shape s_i. Exact for every category: "a red circle" with two red circles fails.
    colour[i]  1 if any detected object has colour c_i (any shape), else 0.
    shape[i]   1 if any detected object has shape s_i (any colour), else 0.
    purity[s]  per shape s named in the prompt: share of detected objects of shape s whose colour the
               prompt asks for with that shape (0 if there are none). GenEval detects by class (our
               shape) and then checks colour, so a stray blue circle next to the requested red one
               confuses it; here it costs purity and strictness.
    relation   position prompts: 1 if the largest detected A and B stand in the relation under
               GenEval's rule (centroid offset shrunk by 0.1 x the summed extents, pointing within ~60
               degrees of the relation's direction), else 0.

`strict` is True iff every check is 1; `partial` is their mean (so partial == 1 iff strict).
Objects whose shape the prompt does not name are ignored by both, as GenEval ignores unrelated
classes; they are counted in `n_unrelated` (this includes blobs of no recognisable shape, detected as
shape "other"). Components of no palette colour, too small (noise) or too large (floods of one
colour) are not objects at all (see `detection`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .detection import Detection, detect_batch, to_work_array
from .prompts import format_prompt, parse_prompt
from .spec import RELATION_THRESHOLD, PromptSpec, relation_strength

if TYPE_CHECKING:
    import torch

__all__ = ["evaluate", "score", "score_arrays", "score_tensors", "summarize"]

_CHUNK = 64  # images per detection batch: fastest on CPU (label propagation waits on the slowest image)


@lru_cache(maxsize=4096)
def _parse_cached(text: str) -> PromptSpec:
    return parse_prompt(text)


def _as_spec(prompt: str | PromptSpec | Mapping[str, Any], index: int) -> PromptSpec:
    try:
        if isinstance(prompt, PromptSpec):
            return prompt
        if isinstance(prompt, str):
            return _parse_cached(prompt)
        if isinstance(prompt, Mapping):
            return PromptSpec.from_dict(prompt)
    except ValueError as exc:
        raise ValueError(f"prompt {index}: {exc}") from None
    raise ValueError(f"prompt {index}: expected a string or PromptSpec, got {type(prompt).__name__}")


def evaluate(detections: Sequence[Detection], spec: PromptSpec) -> dict[str, Any]:
    """Score one image's detections against one prompt's metadata (checks in the module docstring)."""
    checks: dict[str, float] = {}
    for i, o in enumerate(spec.objects):
        found = sum(1 for d in detections if d.colour == o.colour and d.shape == o.shape)
        checks[f"count[{i}]"] = max(0.0, 1.0 - abs(found - o.count) / o.count)
        checks[f"colour[{i}]"] = float(any(d.colour == o.colour for d in detections))
        checks[f"shape[{i}]"] = float(any(d.shape == o.shape for d in detections))
    named: dict[str, set[str]] = {}
    for o in spec.objects:
        named.setdefault(o.shape, set()).add(o.colour)
    for shape, colours in named.items():
        of_shape = [d for d in detections if d.shape == shape]
        right = sum(1 for d in of_shape if d.colour in colours)
        checks[f"purity[{shape}]"] = right / len(of_shape) if of_shape else 0.0
    if spec.relation is not None:
        checks["relation"] = float(_relation_holds(detections, spec))
    partial = float(np.mean(list(checks.values())))
    return {
        "strict": bool(all(v == 1.0 for v in checks.values())),
        "partial": partial,
        "category": spec.category,
        "prompt": format_prompt(spec),
        "checks": checks,
        "objects": [d.to_dict() for d in detections],
        "n_unrelated": sum(1 for d in detections if d.shape not in named),
    }


def _relation_holds(detections: Sequence[Detection], spec: PromptSpec) -> bool:
    rel = spec.relation
    assert rel is not None

    def largest(i: int) -> Detection | None:
        o = spec.objects[i]
        cands = [d for d in detections if d.colour == o.colour and d.shape == o.shape]
        return max(cands, key=lambda d: d.area) if cands else None

    a, b = largest(rel.a), largest(rel.b)
    if a is None or b is None:
        return False
    s = relation_strength((a.cx, a.cy), (b.cx, b.cy), (a.width, a.height), (b.width, b.height), rel.relation)
    return s > RELATION_THRESHOLD


def _check_lengths(n_images: int, prompts: Any) -> list[PromptSpec]:
    if isinstance(prompts, str | PromptSpec):
        raise ValueError("prompts must be a sequence with one prompt per image, not a single prompt")
    if n_images != len(prompts):
        raise ValueError(f"got {n_images} images but {len(prompts)} prompts; pass one prompt per image")
    return [_as_spec(p, i) for i, p in enumerate(prompts)]


def _score_chunks(specs: list[PromptSpec], work: Callable[[int, int], np.ndarray]) -> list[dict[str, Any]]:
    """Detect in chunks (bounded memory), `work(start, stop)` giving the working-resolution array."""
    out: list[dict[str, Any]] = []
    for start in range(0, len(specs), _CHUNK):
        stop = min(start + _CHUNK, len(specs))
        for dets, spec in zip(detect_batch(work(start, stop)), specs[start:stop], strict=True):
            out.append(evaluate(dets, spec))
    return out


def score_arrays(
    images: np.ndarray, prompts: Sequence[str | PromptSpec | Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Score a float/uint8 array [B, H, W, 3] with values in 0..255 (any H, W)."""
    specs = _check_lengths(len(images), prompts)
    return _score_chunks(specs, lambda a, b: to_work_array(np.asarray(images[a:b], dtype=np.float32)))


def score(
    images: Sequence[Image.Image], prompts: Sequence[str | PromptSpec | Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Score PIL RGB images (any sizes, 32 px and up) against prompts of the shapes grammar.

    Returns one dict per image with `strict` (bool), `partial` (float in [0, 1]), `category`,
    `prompt` (canonical text), `checks`, `objects` (detections) and `n_unrelated`. Prompts outside the
    grammar raise ValueError naming the prompt's index and the offending word.
    """
    specs = _check_lengths(len(images), prompts)
    return _score_chunks(specs, lambda a, b: to_work_array(list(images[a:b])))


def score_tensors(
    images: torch.Tensor, prompts: Sequence[str | PromptSpec | Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Score a tensor [B, 3, H, W] in [-1, 1] (the generator's output) without going through PIL."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a tensor [B, 3, H, W], got shape {tuple(images.shape)}")
    arr = (images.detach().float().cpu().clamp(-1.0, 1.0).permute(0, 2, 3, 1).numpy() + 1.0) * 127.5
    return score_arrays(arr, prompts)


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-category means: {category: {"strict", "partial", "n"}} plus "overall".

    "overall" follows GenEval: the mean of the per-category means (each category weighs the same
    whatever its number of images); its "n" is the total number of images.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        groups[str(r.get("category", "unknown"))].append(r)
    summary: dict[str, dict[str, float]] = {}
    for cat, rs in groups.items():
        summary[cat] = {
            "strict": float(np.mean([bool(r["strict"]) for r in rs])),
            "partial": float(np.mean([float(r["partial"]) for r in rs])),
            "n": len(rs),
        }
    if summary:
        summary["overall"] = {
            "strict": float(np.mean([v["strict"] for v in summary.values()])),
            "partial": float(np.mean([v["partial"] for v in summary.values()])),
            "n": len(results),
        }
    return summary
