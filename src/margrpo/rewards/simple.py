"""Model-free rewards: JPEG (in)compressibility, as in DDPO.

DDPO's sanity-check rewards: the size of the image saved as JPEG at quality 95, in kB
(``bytes / 1000``). ``jpeg_incompressibility`` rewards large files (detail, noise),
``jpeg_compressibility`` rewards small ones (flat, simple images) and is the negated size. They need
no weights, so they are the rewards to use for smoke tests of the whole RL loop.

DDPO additionally divides the compressibility reward by 500; pass ``scale=1/500`` to reproduce that.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from margrpo.utils.image_stats import jpeg_size_kb

from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


class _JpegReward(Reward):
    sign = 1.0

    def __init__(self, *, quality: int = 95, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: quality must be in [1, 100], got {quality}")
        self.quality = int(quality)
        self.scale = float(scale)

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        kb = torch.tensor([jpeg_size_kb(im, self.quality) for im in images], dtype=torch.float32)
        return self.sign * self.scale * kb, {"jpeg_kb": kb}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "quality": self.quality, "scale": self.scale}


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegReward):
    """JPEG size in kB at quality 95: larger file, higher reward."""

    sign = 1.0


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegReward):
    """Negated JPEG size in kB at quality 95: smaller file, higher reward."""

    sign = -1.0
