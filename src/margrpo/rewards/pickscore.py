"""``pickscore``: PickScore v1, a CLIP-H fine-tuned on Pick-a-Pic preferences.

Layout as released: the model ``yuvalkirstain/PickScore_v1`` is a transformers ``CLIPModel``
directory; the processor (tokenizer + image preprocessing) is that of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Score = ``logit_scale.exp() * cos(image, text)``, as in the
PickScore README (about 18-23 for typical images).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ._clip import load_hf_clip
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["PickScore"]


@register_reward("pickscore")
class PickScore(Reward):
    """PickScore v1.

    Args:
        model_path: local copy of ``yuvalkirstain/PickScore_v1`` (``config.json`` + weights).
        processor_path: local copy of the processor files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
            (tokenizer + ``preprocessor_config.json``); defaults to ``model_path``.
    """

    def __init__(self, *, model_path: str | os.PathLike, processor_path: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.encoder = load_hf_clip(model_path, processor_path=processor_path, device=self.device, dtype=self.dtype,
                                    what="pickscore")

    def _move(self) -> None:
        self.encoder.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.encoder.source}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        img = self.encoder.image_features(images)
        txt = self.encoder.text_features(prompts)
        return (self.encoder.logit_scale * (img * txt).sum(-1)).to(torch.float32)
