"""Open-vocabulary detectors through transformers (Grounding DINO, OWLv2) and the one interface the rules read.

Why transformers: the MAR-GRPO release vendors Grounding DINO with its CUDA kernels, and GenEval's detector needs
mmdet 2.x / mmcv-full 1.7.2; transformers carries both detectors as plain PyTorch (its Grounding DINO is the port of
``groundingdino_swint_ogc``, the release's checkpoint). Each detector gives, per image, every query's box and its
probability for each text phrase; :meth:`detect` turns that into :class:`DetectedObject` rows for the GenEval rules
(one row per query and class above ``min_score``, as an instance-segmentation head reports (query, class) pairs),
and the T2I-R1 rules read the phrase probabilities directly (:meth:`GroundingDino.phrase_detections`).

Boxes from the models are normalised to the image (``[0, 1]``, corners); :meth:`detect` scales them to pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image

from ._hf import load_hf_model, load_hf_processor, model_dir
from .geneval_rules import DetectedObject

__all__ = ["DETECTORS", "GroundingDino", "ObjectDetector", "Owlv2", "build_detector", "grounding_caption"]

#: Detectors the ``geneval`` reward can run, name -> "module:class" (imported when built).
DETECTORS: dict[str, str] = {
    "grounding_dino": "margrpo.rewards.detectors:GroundingDino",
    "owlv2": "margrpo.rewards.detectors:Owlv2",
    "shapes": "margrpo.worlds.shapes.geneval_bridge:ShapesDetector",
}


@runtime_checkable
class ObjectDetector(Protocol):
    """What the ``geneval`` reward needs from a detector."""

    #: True if the detector fills ``DetectedObject.colour`` itself (then no colour classifier is needed).
    sees_colour: bool

    def detect(self, images: Sequence[Image.Image], classes: Sequence[Sequence[str]], min_score: float
               ) -> list[list[DetectedObject]]:
        """Per image, its detections of the given classes with score above ``min_score`` (pixel boxes)."""
        ...

    def to(self, device: str | torch.device) -> object: ...


def grounding_caption(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Grounding DINO's text prompt ``"car . red bus."`` and each phrase's character span in it (T2I-R1's layout)."""
    spans, pos = [], 0
    for p in phrases:
        spans.append((pos, pos + len(p)))
        pos += len(p) + 3  # " . "
    return " . ".join(phrases) + ".", spans


def _objects(boxes: torch.Tensor, probs: torch.Tensor, classes: Sequence[str], size: tuple[int, int],
             min_score: float) -> list[DetectedObject]:
    """(query, class) pairs above ``min_score`` as DetectedObjects with pixel boxes."""
    w, h = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    px = (boxes.float().cpu() * scale).tolist()
    out = []
    for q, c in (probs.float().cpu() > min_score).nonzero().tolist():
        out.append(DetectedObject(label=classes[c], box=tuple(px[q]), score=float(probs[q, c])))
    return out


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


class _TransformersDetector:
    """Loading, device and dtype shared by the transformers detectors."""

    sees_colour = False
    model_class = ""
    hint = ""

    def __init__(self, model_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        import transformers

        what = type(self).__name__
        self.path = model_dir(model_path, what=what, hint=self.hint)
        self.device, self.dtype = torch.device(device), dtype
        self.model = load_hf_model(getattr(transformers, self.model_class), self.path, device=self.device,
                                   dtype=dtype, what=what)
        self.processor = load_hf_processor(self.path, what=what)

    def to(self, device: str | torch.device) -> _TransformersDetector:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _inputs(self, enc: dict) -> dict:
        return {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device))
                for k, v in enc.items()}

    @torch.no_grad()
    def class_probs(self, images: Sequence[Image.Image], classes: Sequence[Sequence[str]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, ``(boxes [Q, 4] normalised corners, probabilities [Q, len(classes[i])])`` (float32, CPU).

        Images with no class to look for are not run (empty results)."""
        out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.zeros(0, 4), torch.zeros(0, len(c))) for c in classes]
        todo = [i for i, c in enumerate(classes) if c]
        if not todo:
            return out
        enc = self._encode([images[i] for i in todo], [list(classes[i]) for i in todo])
        res = self.model(**self._inputs(dict(enc)))
        boxes = _cxcywh_to_xyxy(res.pred_boxes.float().cpu())
        for k, i in enumerate(todo):
            out[i] = self._image_result(res, k, boxes[k], images[i], classes[i])
        return out

    def _encode(self, images: list[Image.Image], classes: list[list[str]]) -> Any:
        """The processor's inputs for a batch (every image has at least one class)."""
        raise NotImplementedError

    def _image_result(self, res: Any, k: int, boxes: torch.Tensor, image: Image.Image, classes: Sequence[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch row ``k``'s (boxes normalised to the image, class probabilities)."""
        raise NotImplementedError

    def detect(self, images: Sequence[Image.Image], classes: Sequence[Sequence[str]], min_score: float
               ) -> list[list[DetectedObject]]:
        results = self.class_probs(images, classes)
        return [_objects(b, p, cls, im.size, min_score) if cls else []
                for (b, p), cls, im in zip(results, classes, images, strict=True)]


class GroundingDino(_TransformersDetector):
    """Grounding DINO (``GroundingDinoForObjectDetection``): a phrase's probability on a query is the mean of the
    sigmoid token scores over the phrase's tokens (the original's ``create_positive_map_from_span``)."""

    model_class = "GroundingDinoForObjectDetection"
    hint = ("a transformers Grounding DINO folder, e.g. IDEA-Research/grounding-dino-tiny (config.json, "
            "model.safetensors, preprocessor_config.json, tokenizer files)")

    def _encode(self, images: list[Image.Image], classes: list[list[str]]) -> Any:
        return self.processor(images=images, text=[grounding_caption(c)[0] for c in classes], return_tensors="pt",
                              padding=True)

    def _image_result(self, res: Any, k: int, boxes: torch.Tensor, image: Image.Image, classes: Sequence[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        token_probs = res.logits[k].float().sigmoid().cpu()  # [Q, max_text_len]; token j of input_ids at j
        caption, spans = grounding_caption(classes)
        offsets = self.processor.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > token_probs.shape[-1]:
            raise ValueError(f"GroundingDino: the text {caption!r} has {len(offsets)} tokens, more than the model's "
                             f"max_text_len {token_probs.shape[-1]}")
        pos = torch.zeros(len(spans), token_probs.shape[-1])
        for j, (s, e) in enumerate(spans):
            for t, (a, b) in enumerate(offsets):
                if b > a and a < e and b > s:
                    pos[j, t] = 1.0
        if bool((pos.sum(1) == 0).any()):
            raise ValueError(f"GroundingDino: a phrase of {list(classes)!r} maps to no token of {caption!r}")
        return boxes, token_probs.nan_to_num(0.0) @ (pos / pos.sum(1, keepdim=True)).T  # [Q, n]

    def phrase_detections(self, images: Sequence[Image.Image], phrases: Sequence[Sequence[str]], threshold: float
                          ) -> list[list[list[DetectedObject]]]:
        """Per image, per phrase: its boxes (normalised corners) with probability above ``threshold``."""
        out = []
        for (b, p), ph in zip(self.class_probs(images, phrases), phrases, strict=True):
            out.append([[DetectedObject(label=name, box=tuple(b[q].tolist()), score=float(p[q, j]))
                         for q in (p[:, j] > threshold).nonzero().flatten().tolist()]
                        for j, name in enumerate(ph)])
        return out


class Owlv2(_TransformersDetector):
    """OWLv2 (``Owlv2ForObjectDetection``): each class name is a text query; probability = sigmoid(logit).

    OWLv2 pads every image to a square (bottom and right) before resizing, so its boxes are fractions of the
    square's side; they are rescaled to the image here.
    """

    model_class = "Owlv2ForObjectDetection"
    hint = ("a transformers OWLv2 folder, e.g. google/owlv2-base-patch16-ensemble (config.json, weights, "
            "preprocessor_config.json, tokenizer files)")

    def _encode(self, images: list[Image.Image], classes: list[list[str]]) -> Any:
        return self.processor(images=images, text=classes, return_tensors="pt")

    def _image_result(self, res: Any, k: int, boxes: torch.Tensor, image: Image.Image, classes: Sequence[str]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        w, h = image.size
        side = float(max(w, h))
        probs = res.logits[k].float().sigmoid().cpu()  # [Q, most classes in the batch]
        return boxes * torch.tensor([side / w, side / h, side / w, side / h]), probs[:, : len(classes)]


def build_detector(name: str, model_path: str | os.PathLike | None, *, device: torch.device,
                   dtype: torch.dtype) -> ObjectDetector:
    """The detector registered as ``name`` (:data:`DETECTORS`); the shapes world's needs no model_path."""
    import importlib

    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}")
    mod, attr = DETECTORS[name].split(":")
    cls = getattr(importlib.import_module(mod), attr)
    if name == "shapes":
        if model_path is not None:
            raise ValueError("the shapes detector has no model; leave model_path unset")
        return cls()
    if model_path is None:
        raise ValueError(f"detector {name!r} needs model_path: {cls.hint}")
    return cls(model_path, device=device, dtype=dtype)
