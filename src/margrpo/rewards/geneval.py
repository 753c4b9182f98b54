"""``geneval``: GenEval's rules on a detector through transformers (no mmdet), with GenEval's CLIP colour classifier.

The reward reads each sample's GenEval metadata (``tag``, ``include``, ``exclude``; the format of GenEval's
``evaluation_metadata.jsonl`` and Flow-GRPO's ``dataset/geneval/*_metadata.jsonl``, read by
``margrpo.data.prompt_files``), asks the detector for the classes the metadata names, keeps detections and
applies the rules of :mod:`margrpo.rewards.geneval_rules`, and classifies the colour of the objects the rules look
at with zero-shot CLIP as GenEval does: each crop (the box; with a mask, the object over grey ``#999``) against
``"a photo of a {c} {class}"``, ``"a photo of a {c}-colored {class}"`` and ``"a photo of a {c} object"`` for the ten
colours of :data:`~margrpo.rewards.geneval_rules.COLOURS` (the three prompts' unit text embeddings averaged and
renormalised per colour, then the most similar colour wins).

Differences from GenEval, and why:

- Detector: GenEval runs Mask2Former (Swin-S, COCO) through mmdet 2.x / mmcv-full 1.7.2; here an open-vocabulary
  detector is queried with the metadata's class names (``grounding_dino``, ``owlv2``), or the shapes world's own
  detector (``shapes``). Mask2Former scores the 80 COCO classes jointly; an open-vocabulary detector scores each
  named class on each box, so one box may count for two named classes (Mask2Former's instance head can also
  report one query under two classes). Thresholds are GenEval's, tuned for Mask2Former; a different detector's
  scores are calibrated differently (``threshold``, ``counting_threshold`` are options).
- Masks: neither transformers detector gives masks, so colour is classified on the box crop with its background.
- OWLv2 reports several overlapping boxes for one object; GenEval's default keeps them all (``max_overlap: 1.0``,
  no suppression), which over-counts. Set ``max_overlap`` (GenEval's option of that name, e.g. 0.5) with OWLv2.

``mode`` picks the score: ``partial`` (Flow-GRPO's dense reward, which the MAR-GRPO release trains on),
``exact`` (Flow-GRPO's ``strict_correct``) or ``correct`` (GenEval's own pass/fail); all three are logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from ._clip import ClipEncoder, build_clip_encoder
from .base import Reward, ScoreResult
from .detectors import DETECTORS, build_detector
from .geneval_rules import COLOURS, DetectedObject, GenevalRules, colour_requests, evaluate, keep_objects
from .registry import register_reward

__all__ = ["ClipColourClassifier", "GenevalReward"]

_MODES = ("partial", "exact", "correct")
COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
CROP_BACKGROUND = (153, 153, 153)  # GenEval's "#999"


class ClipColourClassifier:
    """GenEval's zero-shot colour classifier over :data:`COLOURS` on object crops."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder
        self._text: dict[str, torch.Tensor] = {}

    def _weights(self, classname: str) -> torch.Tensor:
        if classname not in self._text:
            texts = [t.format(c=c, cls=classname) for c in COLOURS for t in COLOUR_TEMPLATES]
            feats = self.encoder.text_features(texts).view(len(COLOURS), len(COLOUR_TEMPLATES), -1)
            self._text[classname] = torch.nn.functional.normalize(feats.mean(1), dim=-1)
        return self._text[classname]

    @staticmethod
    def crop(image: Image.Image, obj: DetectedObject) -> Image.Image:
        """The object's crop as GenEval cuts it (mask over grey where given; at least one pixel a side)."""
        if obj.mask is not None:
            mask = Image.fromarray(obj.mask.astype("uint8") * 255, mode="L")
            image = Image.composite(image, Image.new("RGB", image.size, CROP_BACKGROUND), mask)
        x0, y0, x1, y1 = (round(v) for v in obj.box)
        x0, y0 = min(max(x0, 0), image.width - 1), min(max(y0, 0), image.height - 1)
        return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))

    def __call__(self, crops: Sequence[Image.Image], classnames: Sequence[str]) -> list[str]:
        if not crops:
            return []
        feats = self.encoder.image_features(list(crops))
        out = []
        for f, cls in zip(feats, classnames, strict=True):
            w = self._weights(cls).to(f.device)
            out.append(COLOURS[int((w @ f).argmax())])
        return out


@register_reward("geneval")
class GenevalReward(Reward):
    """GenEval's rules on a transformers detector (or the shapes world's) with CLIP colours.

    Args:
        detector: ``grounding_dino``, ``owlv2`` or ``shapes``.
        model_path: the detector's transformers folder (not for ``shapes``).
        clip_model_path: a transformers CLIP folder for colours (GenEval: ``openai/clip-vit-large-patch14``), or
        clip_checkpoint: an open_clip ViT-L-14 state dict (with ``tokenizer_path`` where open_clip does not import).
            Neither is needed with a detector that sees colours (``shapes``).
        mode: ``partial`` | ``exact`` | ``correct`` (module docstring).
        threshold, counting_threshold, max_objects, max_overlap, position_margin: GenEval's options
            (:class:`~margrpo.rewards.geneval_rules.GenevalRules`).
    """

    def __init__(self, *, detector: str, model_path: str | os.PathLike | None = None,
                 clip_model_path: str | os.PathLike | None = None, clip_checkpoint: str | os.PathLike | None = None,
                 clip_arch: str = "ViT-L-14", quick_gelu: bool = True, tokenizer_path: str | os.PathLike | None = None,
                 backend: str = "auto", mode: str = "partial", threshold: float = 0.3, counting_threshold: float = 0.9,
                 max_objects: int = 16, max_overlap: float = 1.0, position_margin: float = 0.1,
                 **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 8)
        super().__init__(**kwargs)
        if mode not in _MODES:
            raise ValueError(f"geneval: mode must be one of {_MODES}, got {mode!r}")
        if detector not in DETECTORS:
            raise ValueError(f"geneval: detector must be one of {sorted(DETECTORS)}, got {detector!r}")
        self.mode = mode
        self.detector_name = detector
        self.rules = GenevalRules(threshold=threshold, counting_threshold=counting_threshold,
                                  max_objects=max_objects, max_overlap=max_overlap, position_margin=position_margin)
        self.detector = build_detector(detector, model_path, device=self.device, dtype=self.dtype)
        self.colours: ClipColourClassifier | None = None
        if not self.detector.sees_colour:
            if clip_model_path is None and clip_checkpoint is None:
                raise ValueError(f"geneval: the {detector!r} detector does not see colours; set clip_model_path (a "
                                 "transformers CLIP folder, GenEval's is openai/clip-vit-large-patch14) or "
                                 "clip_checkpoint (an open_clip ViT-L-14 state dict)")
            enc = build_clip_encoder(model_path=clip_model_path, checkpoint=clip_checkpoint, arch=clip_arch,
                                     backend=backend, tokenizer_path=tokenizer_path, quick_gelu=quick_gelu,
                                     device=self.device, dtype=self.dtype, what="geneval colour classifier")
            self.colours = ClipColourClassifier(enc)

    def _move(self) -> None:
        self.detector.to(self.device)
        if self.colours is not None:
            self.colours.encoder.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "detector": self.detector_name, "mode": self.mode,
                "colours": None if self.colours is None else self.colours.encoder.source}

    @staticmethod
    def _classes(meta: Mapping[str, Any]) -> list[str]:
        names = [it.get("class") for key in ("include", "exclude") for it in (meta.get(key) or [])
                 if isinstance(it, Mapping)]
        return list(dict.fromkeys(n for n in names if isinstance(n, str)))

    def _fill_colours(self, images: list[Image.Image], kept: list[dict[str, list[DetectedObject]]],
                      metadata: list[dict[str, Any]]) -> None:
        """Classify, in one pass, the colour of every object the rules will read (in place)."""
        if self.colours is None:
            return
        where, crops, names = [], [], []
        for i, (objs, meta) in enumerate(zip(kept, metadata, strict=True)):
            for cls, k in colour_requests(objs, meta):
                where.append((i, cls, k))
                crops.append(self.colours.crop(images[i], objs[cls][k]))
                names.append(cls)
        for (i, cls, k), colour in zip(where, self.colours(crops, names), strict=True):
            kept[i][cls][k] = replace(kept[i][cls][k], colour=colour)

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        for i, meta in enumerate(metadata):
            if "include" not in meta:
                raise ValueError(f"geneval: sample {i} ({prompts[i]!r}) has no GenEval metadata ('include' missing; "
                                 f"keys: {sorted(meta)}); train on a GenEval metadata file (tag, include, exclude)")
        floor = min(self.rules.threshold, self.rules.counting_threshold)
        dets = self.detector.detect(images, [self._classes(m) for m in metadata], floor)
        kept = [keep_objects(d, m.get("tag"), self.rules) for d, m in zip(dets, metadata, strict=True)]
        self._fill_colours(images, kept, metadata)
        results = [evaluate(k, m, self.rules) for k, m in zip(kept, metadata, strict=True)]
        comps = {"partial": torch.tensor([r.score for r in results]),
                 "exact": torch.tensor([float(r.exact) for r in results]),
                 "correct": torch.tensor([float(r.correct) for r in results])}
        cats = [str(m.get("tag", "unknown")) for m in metadata]
        return comps[self.mode], comps, cats
