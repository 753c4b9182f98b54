"""The ``shapes`` reward: the programmatic verifier of the synthetic shapes world.

It wraps :func:`margrpo.worlds.shapes.score`, which returns for each (image, prompt) a dict with
``strict`` (bool: every constraint of the prompt holds), ``partial`` (float in [0, 1]: the fraction
that holds) and ``category`` (the task family). The reward is ``partial`` (dense, the default for
training) or ``float(strict)`` (``mode="strict"``, the headline evaluation metric); both are always
logged, and ``category`` is passed on for per-category metrics.

The world module is imported lazily, inside the reward, so that this module (and the registry)
import even where the shapes world is not installed; the error then says what is missing.
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any

import torch
from PIL import Image

from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["ShapesReward"]

log = logging.getLogger(__name__)

_MODES = ("partial", "strict")


def _load_verifier() -> Any:
    try:
        mod = importlib.import_module("margrpo.worlds.shapes")
    except ImportError as e:
        raise ImportError(
            f"the 'shapes' reward needs margrpo.worlds.shapes (the shapes world verifier), which failed to "
            f"import: {e}"
        ) from e
    if not hasattr(mod, "score"):
        raise ImportError("margrpo.worlds.shapes has no score(images, prompts) function; the 'shapes' reward needs it")
    return mod


@register_reward("shapes")
class ShapesReward(Reward):
    """Shapes-world verifier as a reward.

    Args:
        mode: ``"partial"`` (fraction of satisfied constraints) or ``"strict"`` (1.0 iff all hold).
        **kwargs: :class:`~margrpo.rewards.base.Reward` options (``batch_size``, ``catch_errors``...).
    """

    def __init__(self, *, mode: str = "partial", **kwargs: Any) -> None:
        kwargs.pop("dtype", None)  # the verifier has no compute dtype
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"shapes: mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self._verifier = _load_verifier()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "mode": self.mode}

    def _score_one(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        try:
            return self._verifier.score([image], [prompt])[0]
        except ValueError as e:
            log.warning("shapes verifier cannot score prompt %r: %s", prompt, e)
            return {"strict": False, "partial": math.nan, "category": "invalid"}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        try:
            results = self._verifier.score(images, prompts)
        except ValueError as e:
            # e.g. one prompt outside the shapes grammar: score one by one so only that sample is lost
            log.warning("shapes verifier refused a batch (%s); scoring its %d samples one by one", e, len(images))
            results = [self._score_one(im, p) for im, p in zip(images, prompts, strict=True)]
        if len(results) != len(images):
            raise ValueError(f"shapes verifier returned {len(results)} results for {len(images)} images")
        strict, partial, cats = [], [], []
        for i, r in enumerate(results):
            try:
                s, p = float(bool(r["strict"])), float(r["partial"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"shapes verifier result {i} lacks strict/partial ({e!r}): {r!r}") from e
            strict.append(s)
            partial.append(p if math.isfinite(p) else math.nan)
            cats.append(str(r.get("category", "unknown")))
        st = torch.tensor(strict, dtype=torch.float32)
        pa = torch.tensor(partial, dtype=torch.float32)
        scores = pa if self.mode == "partial" else torch.where(torch.isfinite(pa), st, pa)
        return scores, {"strict": st, "partial": pa}, cats
