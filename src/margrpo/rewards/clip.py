"""``clip_score``: cosine similarity between CLIP image and prompt embeddings.

The reference's ``clip`` reward is open_clip ViT-H-14 with the LAION-2B weights and the plain cosine
(no x100). Any standard CLIP works: an open_clip state dict (``checkpoint`` + ``arch``) or a
transformers CLIP directory (``model_path``). ``scale`` multiplies the cosine (100 gives the
"CLIPScore x 100" convention used by some papers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ._clip import build_clip_encoder
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["ClipScore"]


@register_reward("clip_score")
class ClipScore(Reward):
    """``scale * cos(image_features, text_features)``.

    Args:
        checkpoint: open_clip state dict file (e.g. ``open_clip_pytorch_model.bin`` of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Exclusive with ``model_path``.
        arch: open_clip architecture name of ``checkpoint`` (``ViT-H-14``, ``ViT-B-32``...).
        tokenizer_path: transformers CLIP tokenizer directory, needed when open_clip is not importable.
        backend: ``auto`` | ``open_clip`` | ``transformers`` (see :mod:`margrpo.rewards._clip`).
        quick_gelu: True for OpenAI-trained weights in open_clip format.
        model_path / processor_path: a transformers CLIP directory instead of ``checkpoint``.
        preprocess: ``shortest_crop`` (open_clip eval transform) or ``longest_pad`` (HPS v2 transform).
        scale: multiplier on the cosine.
        vision_head_width: attention head width of the vision tower when it is not the arch's known one.
    """

    def __init__(self, *, checkpoint: str | os.PathLike | None = None, arch: str = "ViT-H-14",
                 tokenizer_path: str | os.PathLike | None = None, backend: str = "auto", quick_gelu: bool = False,
                 model_path: str | os.PathLike | None = None, processor_path: str | os.PathLike | None = None,
                 preprocess: str | None = None, scale: float = 1.0, vision_head_width: int | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.encoder = build_clip_encoder(model_path=model_path, processor_path=processor_path, checkpoint=checkpoint,
                                          arch=arch, backend=backend, tokenizer_path=tokenizer_path,
                                          quick_gelu=quick_gelu, vision_head_width=vision_head_width,
                                          preprocess_mode=preprocess, device=self.device,
                                          dtype=self.dtype, what="clip_score")

    def _move(self) -> None:
        self.encoder.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.encoder.source, "backend": self.encoder.kind, "scale": self.scale}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        img = self.encoder.image_features(images)
        txt = self.encoder.text_features(prompts)
        return self.scale * (img * txt).sum(-1).to(torch.float32)
