"""``hpsv2``: Human Preference Score v2 / v2.1 (the reference's main reward).

HPS v2 is open_clip ViT-H-14 fine-tuned on human preferences; its release file
(``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt``, HF repo ``xswu/HPSv2``) is
``torch.save({"state_dict": model.state_dict()})`` of the whole open_clip model, so no separate CLIP
weights are needed. The score is ``image_features . text_features`` of the L2-normalised features
(no logit scale), about 0.2-0.35 for typical images, with HPS v2's own eval transform (long side to
224 by bicubic antialiased resize, zero padding to square).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from ._clip import load_openclip_checkpoint
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["HPSv2"]


@register_reward("hpsv2")
class HPSv2(Reward):
    """HPS v2 / v2.1 preference score.

    Args:
        checkpoint: ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``).
        tokenizer_path: transformers CLIP tokenizer directory (a local copy of
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); needed where open_clip is not importable.
        arch: open_clip architecture of the checkpoint (``ViT-H-14`` for every HPS v2 release).
        backend: ``auto`` | ``open_clip`` | ``transformers``.
        preprocess: ``longest_pad`` (HPS v2's transform, default) or ``shortest_crop``.
    """

    def __init__(self, *, checkpoint: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                 arch: str = "ViT-H-14", backend: str = "auto", preprocess: str = "longest_pad",
                 vision_head_width: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.encoder = load_openclip_checkpoint(checkpoint, arch=arch, backend=backend, tokenizer_path=tokenizer_path,
                                                vision_head_width=vision_head_width, preprocess_mode=preprocess,
                                                device=self.device, dtype=self.dtype, what="hpsv2")

    def _move(self) -> None:
        self.encoder.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.encoder.source, "backend": self.encoder.kind}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        img = self.encoder.image_features(images)
        txt = self.encoder.text_features(prompts)
        return (img * txt).sum(-1).to(torch.float32)
