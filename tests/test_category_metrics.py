"""Per-category accuracy of a training step, on hand-worked reward outputs."""

import pytest
import torch

from margrpo.rewards.base import RewardOutput
from margrpo.rl.category_metrics import accuracy_metrics


def test_accuracy_per_category_hand_worked():
    nan = float("nan")
    out = RewardOutput(scores=torch.tensor([1.0, 0.5, 0.0, 1.0, nan, 0.5]),
                       valid=torch.tensor([True, True, True, True, False, True]),
                       components={"shapes/strict": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
                                   "shapes/partial": torch.tensor([1.0, 0.5, 0.0, 1.0, nan, 0.5])},
                       categories=["single", "single", "position", "position", "counting", "counting"])
    rec = accuracy_metrics(out)
    # the invalid image (counting, strict 1) counts nowhere: counting keeps one valid image with strict 0
    assert rec == {"accuracy/strict": pytest.approx(2 / 5), "accuracy/by_category/single": 0.5,
                   "accuracy/by_category/position": 0.5, "accuracy/by_category/counting": 0.0}
    summary = out.summary("reward")  # the reward's own per-category means sit beside them
    assert summary["reward/by_category/single"] == 0.75 and "reward/by_category/counting" in summary
    assert accuracy_metrics(RewardOutput(scores=torch.ones(2), valid=torch.ones(2, dtype=torch.bool))) == {}
    no_cats = RewardOutput(scores=torch.ones(2), valid=torch.ones(2, dtype=torch.bool),
                           components={"shapes/strict": torch.tensor([1.0, 0.0])})
    assert accuracy_metrics(no_cats) == {"accuracy/strict": 0.5}
