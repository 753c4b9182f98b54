"""Control rewards: what a trainer must do with a reward that is easy, and with one that carries nothing.

* `colour_fraction` (positive control): the share of pixels close to one colour, dense and easy. A
  trainer that cannot raise this within a few minutes has a broken estimator; no other result counts
  until it can. Any image model can satisfy it by painting more of the
  colour, so it also works on untrained or unrelated models.
* `random` (null control): a pseudo-random number per image, uniform on [0, 1) and unlearnable. Its
  policy gradient is zero in expectation, so whatever a run under it does to another metric (log the
  verifier beside it with weight 0) is the optimizer's noise-driven drift, the floor any real reward
  must beat. The score is a keyed hash of the image's pixels: the same image always gets the same
  score, so runs stay reproducible and resumable.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["ColourFraction", "RandomReward"]


@register_reward("colour_fraction")
class ColourFraction(Reward):
    """Fraction of pixels within `tolerance` (RGB Euclidean, 0..255 scale) of `colour`.

    Args:
        colour: target RGB triple (default the shapes world's red).
        tolerance: RGB distance that still counts as the colour.
    """

    def __init__(self, *, colour: tuple[int, int, int] | list[int] = (220, 30, 30), tolerance: float = 80.0,
                 **kwargs: Any) -> None:
        kwargs.pop("dtype", None)
        super().__init__(**kwargs)
        if len(colour) != 3 or any(not 0 <= int(c) <= 255 for c in colour):
            raise ValueError(f"colour_fraction: colour must be an RGB triple in 0..255, got {colour!r}")
        if tolerance <= 0:
            raise ValueError(f"colour_fraction: tolerance must be > 0, got {tolerance}")
        self.colour = np.asarray([int(c) for c in colour], dtype=np.float32)
        self.tolerance = float(tolerance)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "colour": self.colour.astype(int).tolist(), "tolerance": self.tolerance}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        out = []
        for im in images:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
            dist = np.linalg.norm(arr - self.colour, axis=-1)
            out.append(float((dist <= self.tolerance).mean()))
        return torch.tensor(out, dtype=torch.float32)


@register_reward("random")
class RandomReward(Reward):
    """Uniform [0, 1) score from a keyed BLAKE2b hash of the 8-bit RGB pixels (null control).

    Args:
        seed: the hash key; different seeds give independent scores for the same image.
    """

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        kwargs.pop("dtype", None)
        super().__init__(**kwargs)
        self.seed = int(seed)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        key = self.seed.to_bytes(8, "little", signed=True)
        out = []
        for im in images:
            digest = hashlib.blake2b(np.asarray(im.convert("RGB")).tobytes(), key=key, digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") / 2**64)
        return torch.tensor(out, dtype=torch.float32)
