"""Per-category accuracy of a training step's rollout, beside the reward's own per-category means.

Why: a step's mean reward mixes categories of very different difficulty (the shipped base draws held-out single
objects 70% of the time and positions 14%), so with a few prompts per step its curve moves with the step's
category mix, not with learning. The reward's `summary()` already logs `reward/by_category/<c>`; this adds the
verifier's strict accuracy per category, `accuracy/by_category/<c>`, and its overall mean `accuracy/strict`.
"""

from __future__ import annotations

import torch

from margrpo.rewards.base import RewardOutput


def strict_component(out: RewardOutput) -> str | None:
    """The name of the reward's strict-accuracy component (`shapes/strict` for the shapes verifier), if any."""
    return next((k for k in out.components if k.endswith("/strict")), None)


def accuracy_metrics(out: RewardOutput) -> dict[str, float]:
    """`accuracy/strict` over the valid images and `accuracy/by_category/<c>` per category with a valid image;
    empty when the reward has no strict component. Means over images (each image of a group counts once)."""
    key = strict_component(out)
    if key is None:
        return {}
    strict = out.components[key].float()
    valid = out.valid & torch.isfinite(strict)
    rec = {"accuracy/strict": float(strict[valid].mean()) if bool(valid.any()) else 0.0}
    if out.categories is not None:
        for cat in sorted(set(out.categories)):
            m = valid & torch.tensor([c == cat for c in out.categories], dtype=torch.bool)
            if bool(m.any()):
                rec[f"accuracy/by_category/{cat}"] = float(strict[m].mean())
    return rec
