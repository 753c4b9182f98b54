"""``aesthetic``: the LAION improved aesthetic predictor (the "LAION aesthetic score", about 1-10).

An MLP on the L2-normalised CLIP ViT-L/14 image embedding (OpenAI weights), trained on SAC + LOGOS +
AVA ratings. The head file ``sac+logos+ava1-l14-linearMSE.pth`` (repo
christophschuhmann/improved-aesthetic-predictor) is a state dict of
``Linear(768,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
Linear(16,1)``, i.e. keys ``layers.{0,2,4,6,7}.{weight,bias}`` (no activations: that is how it was
trained). The prompt is not used.

The CLIP part is a transformers directory (``clip_model_path``, e.g. ``openai/clip-vit-large-patch14``)
or an open_clip state dict of ViT-L-14 with OpenAI weights (``clip_checkpoint``, ``quick_gelu`` on).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch import nn

from ._clip import build_clip_encoder, load_state_dict_file
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["AestheticMLP", "AestheticScore"]


class AestheticMLP(nn.Module):
    """The predictor head shared by the LAION aesthetic predictor and ImageReward (same key layout)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], *, source: str, prefix: str = "layers.") -> AestheticMLP:
        key = f"{prefix}0.weight"
        if key not in sd:
            raise ValueError(f"{source}: not an aesthetic/ImageReward MLP state dict (no {key!r}; keys: "
                             f"{sorted(sd)[:6]}...)")
        mlp = cls(int(sd[key].shape[1]))
        own = {k[len(prefix) - len("layers."):]: v for k, v in sd.items() if k.startswith(prefix)}
        missing, unexpected = mlp.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: MLP keys do not match layers.{{0,2,4,6,7}}: missing {missing}, "
                             f"unexpected {unexpected}")
        return mlp.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticScore(Reward):
    """LAION improved aesthetic predictor.

    Args:
        checkpoint: the MLP head, ``sac+logos+ava1-l14-linearMSE.pth``.
        clip_model_path: transformers CLIP ViT-L/14 directory (``openai/clip-vit-large-patch14``), or
        clip_checkpoint: an open_clip ViT-L-14 state dict (with ``clip_arch``, ``quick_gelu=True`` for
            OpenAI weights, and ``tokenizer_path`` where open_clip is not importable).
    """

    def __init__(self, *, checkpoint: str | os.PathLike, clip_model_path: str | os.PathLike | None = None,
                 clip_checkpoint: str | os.PathLike | None = None, clip_arch: str = "ViT-L-14",
                 quick_gelu: bool = True, tokenizer_path: str | os.PathLike | None = None,
                 backend: str = "auto", vision_head_width: int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.encoder = build_clip_encoder(model_path=clip_model_path, checkpoint=clip_checkpoint, arch=clip_arch,
                                          backend=backend, tokenizer_path=tokenizer_path, quick_gelu=quick_gelu,
                                          vision_head_width=vision_head_width, need_text=False,
                                          device=self.device, dtype=self.dtype, what="aesthetic")
        self.checkpoint = str(checkpoint)
        self.mlp = AestheticMLP.from_state_dict(load_state_dict_file(checkpoint, what="aesthetic head"),
                                                source=self.checkpoint).to(self.device)

    def _move(self) -> None:
        self.encoder.to(self.device)
        self.mlp.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "clip": self.encoder.source, "head": self.checkpoint}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        feats = self.encoder.image_features(images)  # L2-normalised float32, as in the reference
        return self.mlp(feats.to(self.device)).reshape(-1).float()
