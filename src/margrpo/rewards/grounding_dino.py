"""``grounding_dino``: the T2I-R1 / MAR-GRPO detector reward (spatial, numeracy, object presence) on transformers.

The release (AMAP-ML/mar-grpo ``src/grpo/src/utils/reward_gdino.py``, from CaraJ7/T2I-R1) vendors Grounding DINO
with its CUDA kernels; here it is transformers' ``GroundingDinoForObjectDetection`` with its processor, read from a
local folder (``IDEA-Research/grounding-dino-tiny`` is the transformers port of the release's
``groundingdino_swint_ogc``). Each sample needs the T2I-R1 metadata of its prompt file (``task_type``, ``nouns``,
``spatial_info`` or ``numeracy_info``), which ``margrpo.data.prompt_files`` keeps for the reward. The nouns are
joined into Grounding DINO's text (``"car . zebra."``), and the rules of :mod:`margrpo.rewards.t2i_r1_rules` (with
where and why they differ from the release) score the boxes above ``box_threshold``. Images are preprocessed by the
folder's processor (shortest side 800, longest at most 1333, ImageNet normalisation, as the release's transform).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image

from .base import Reward, ScoreResult
from .detectors import GroundingDino
from .registry import register_reward
from .t2i_r1_rules import BOX_THRESHOLD, score_record

__all__ = ["GroundingDinoReward", "require_t2i_r1_metadata"]


def require_t2i_r1_metadata(meta: dict[str, Any], index: int, prompt: str, what: str) -> list[str]:
    """The record's ``nouns``; a sample without them cannot be scored (and is not silently given 1)."""
    nouns = meta.get("nouns")
    if not isinstance(nouns, list) or not all(isinstance(n, str) for n in nouns):
        raise ValueError(f"{what}: sample {index} ({prompt!r}) has no T2I-R1 metadata ('nouns' missing or not a list "
                         f"of strings; keys: {sorted(meta)}); train on a T2I-R1 prompt file (prompt, task_type, "
                         "nouns, spatial_info | numeracy_info | attr_nouns)")
    return list(nouns)


@register_reward("grounding_dino")
class GroundingDinoReward(Reward):
    """T2I-R1's Grounding DINO reward.

    Args:
        model_path: a transformers Grounding DINO folder (config.json, weights, preprocessor_config.json,
            tokenizer files).
        box_threshold: a noun is found on boxes whose phrase probability exceeds this (release: 0.3).
    """

    def __init__(self, *, model_path: str | os.PathLike, box_threshold: float = BOX_THRESHOLD, **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 8)
        super().__init__(**kwargs)
        if not 0.0 <= box_threshold < 1.0:
            raise ValueError(f"grounding_dino: box_threshold must be in [0, 1), got {box_threshold!r}")
        self.box_threshold = float(box_threshold)
        self.detector = GroundingDino(model_path, device=self.device, dtype=self.dtype)

    def _move(self) -> None:
        self.detector.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": str(self.detector.path), "box_threshold": self.box_threshold}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        nouns = [require_t2i_r1_metadata(m, i, p, self.name)
                 for i, (m, p) in enumerate(zip(metadata, prompts, strict=True))]
        found = self.detector.phrase_detections(images, nouns, self.box_threshold)
        scores = [score_record(f, m) for f, m in zip(found, metadata, strict=True)]
        cats = [str(m.get("task_type", "unknown")) for m in metadata]
        return torch.tensor(scores, dtype=torch.float32), {}, cats
