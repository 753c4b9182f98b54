"""The reward registry and the weighted sum: `build_rewards({"shapes": 1.0, "hpsv2": 0.5})` -> one reward.

Rewards register under a name (`register_reward`); model-based ones are imported only when built, so importing
`margrpo.rewards` stays cheap and does not need transformers or open_clip.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from .base import ImageBatch, Reward, RewardFn, RewardOutput, ScoreResult, _check_batch, to_pil_images

_REGISTRY: dict[str, Callable[..., Reward]] = {}
# name -> "module:attr" for rewards whose module is imported only when they are built, so that
# `import margrpo.rewards` stays cheap and does not need transformers/open_clip.
_LAZY: dict[str, str] = {
    "jpeg_compressibility": "margrpo.rewards.simple:JpegCompressibility",
    "jpeg_incompressibility": "margrpo.rewards.simple:JpegIncompressibility",
    "shapes": "margrpo.rewards.shapes:ShapesReward",
    "clip_score": "margrpo.rewards.clip:ClipScore",
    "pickscore": "margrpo.rewards.pickscore:PickScore",
    "hpsv2": "margrpo.rewards.hps:HPSv2",
    "imagereward": "margrpo.rewards.imagereward:ImageRewardScore",
    "aesthetic": "margrpo.rewards.aesthetic:AestheticScore",
    "grounding_dino": "margrpo.rewards.grounding_dino:GroundingDinoReward",
    "git_vqa": "margrpo.rewards.git_vqa:GitVqaReward",
    "geneval": "margrpo.rewards.geneval:GenevalReward",
    "hpsv3": "margrpo.rewards.hpsv3:HPSv3",
    "remote": "margrpo.rewards.remote.client:RemoteReward",
    "colour_fraction": "margrpo.rewards.control:ColourFraction",
    "random": "margrpo.rewards.control:RandomReward",
}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: make a reward class/factory buildable by ``name`` (and set its ``name``)."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        if isinstance(factory, type):
            factory.name = name
        return factory

    return deco


def available_rewards() -> list[str]:
    """Names ``build_reward`` accepts."""
    return sorted(set(_REGISTRY) | set(_LAZY))


def _resolve(name: str) -> Callable[..., Reward]:
    if name not in _REGISTRY and name in _LAZY:
        import importlib

        mod, attr = _LAZY[name].split(":")
        importlib.import_module(mod)
        if name not in _REGISTRY:  # module defines the class but registration failed
            _REGISTRY[name] = getattr(importlib.import_module(mod), attr)
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}; registered rewards are: {', '.join(available_rewards())}")
    return _REGISTRY[name]


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as ``name`` with its keyword options."""
    factory = _resolve(name)
    try:
        reward = factory(**kwargs)
    except TypeError as e:
        raise TypeError(f"reward {name!r}: bad options {sorted(kwargs)}: {e}") from e
    return reward


def build_rewards(spec: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]] | None = None, *,
                  device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
                  ) -> CompositeReward:
    """Build the weighted sum from the training config's ``rewards:`` mapping.

    Each entry is ``label: weight`` (a number), or ``label: {weight: w, type: registry_name, ...}`` where
    the other keys are the reward's options. ``type`` defaults to ``label``, so the same reward can
    appear twice with different options, e.g.::

        rewards:
          hpsv2: {weight: 1.0, checkpoint: /ckpt/HPS_v2.1_compressed.pt, tokenizer_path: /ckpt/clip-h}
          shapes_strict: {type: shapes, weight: 0.5, mode: strict}
          jpeg_compressibility: 0.1

    ``options`` (e.g. the config's ``reward_options:`` section) gives per-label options separately, for
    configs whose ``rewards`` field is a plain ``{name: weight}`` mapping; options written inline win.
    ``device``/``dtype`` are defaults for parts that do not set their own.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec))
    if unknown:
        raise KeyError(f"reward options given for {unknown}, which are not in rewards {sorted(spec)}")
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"rewards must be a non-empty mapping of name -> weight or options, got {spec!r}")
    parts: list[tuple[str, float, Reward]] = []
    for label, entry in spec.items():
        if isinstance(entry, bool) or not isinstance(entry, int | float | Mapping):
            raise ValueError(f"rewards.{label}: expected a number (weight) or a mapping of options, got {entry!r}")
        inline: dict[str, Any] = {"weight": float(entry)} if not isinstance(entry, Mapping) else dict(entry)
        extra = options.get(label, {})
        if not isinstance(extra, Mapping):
            raise ValueError(f"reward options for {label!r} must be a mapping, got {extra!r}")
        opts = {**dict(extra), **inline}
        weight = opts.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"rewards.{label}.weight must be a finite number, got {weight!r}")
        rtype = str(opts.pop("type", label))
        if rtype not in available_rewards():
            raise KeyError(f"rewards.{label}: unknown reward type {rtype!r}; "
                           f"registered: {', '.join(available_rewards())}")
        if device is not None:
            opts.setdefault("device", device)
        if dtype is not None:
            opts.setdefault("dtype", dtype)
        factory = _resolve(rtype)
        try:
            reward = factory(**opts)
        except TypeError as e:
            raise TypeError(f"rewards.{label} (type {rtype!r}): bad options {sorted(opts)}: {e}") from e
        parts.append((str(label), float(weight), reward))
    return CompositeReward(parts)


class CompositeReward(Reward):
    """Weighted sum of rewards; each part's raw score is logged under its label.

    A sample is valid only if every part with non-zero weight is valid for it, and its reasons name
    the failing parts. Parts are scored in order on the same inputs (images are converted once).
    """

    name = "composite"

    def __init__(self, parts: Sequence[tuple[str, float, RewardFn]]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("CompositeReward needs at least one part")
        labels = [p[0] for p in parts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"CompositeReward part labels must be unique, got {labels}")
        self.parts = [(str(lbl), float(w), r) for lbl, w, r in parts]
        self.name = "+".join(labels)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "parts": [
            {"label": lbl, "weight": w, **(r.describe() if hasattr(r, "describe") else {"name": r.name})}
            for lbl, w, r in self.parts
        ]}

    def to(self, device: str | torch.device) -> CompositeReward:
        for _, _, r in self.parts:
            if hasattr(r, "to"):
                r.to(device)
        return self

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:  # pragma: no cover - __call__ overridden
        raise NotImplementedError

    def __call__(self, images: ImageBatch, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        t0 = time.perf_counter()
        pils, pre = to_pil_images(images)
        meta = _check_batch(len(pils), prompts, metadata)
        n = len(pils)
        total = torch.zeros(n, dtype=torch.float32)
        valid = torch.tensor([r is None for r in pre], dtype=torch.bool)
        reasons: list[str | None] = list(pre)
        comps: dict[str, torch.Tensor] = {}
        cats: list[str] | None = None
        for label, weight, reward in self.parts:
            out = reward(pils, list(prompts), meta)
            if len(out) != n:
                raise ValueError(f"reward part {label!r} returned {len(out)} scores for {n} samples")
            comps[label] = out.scores
            for k, v in out.components.items():
                comps[f"{label}/{k}"] = v
            if cats is None and out.categories is not None:
                cats = out.categories
            if weight == 0.0:
                continue
            total = total + weight * torch.nan_to_num(out.scores, nan=0.0)
            for i in range(n):
                if not bool(out.valid[i]):
                    valid[i] = False
                    part_reason = out.reasons[i] or "invalid"
                    reasons[i] = part_reason if reasons[i] is None else f"{reasons[i]}; {part_reason}"
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        return RewardOutput(total, valid, comps, reasons, cats, time.perf_counter() - t0)
