"""Rewards: one protocol (:class:`RewardFn`), a registry, a weighted sum, and a remote server/client.

Importing this package is cheap: model-based rewards (transformers, open_clip) and the shapes world
are imported only when a reward that needs them is built (see ``available_rewards()``).
"""

from __future__ import annotations

from .base import ImageBatch, Reward, RewardFailure, RewardFailureGuard, RewardFn, RewardOutput, to_pil_images
from .registry import CompositeReward, available_rewards, build_reward, build_rewards, register_reward

__all__ = [
    "CompositeReward",
    "ImageBatch",
    "Reward",
    "RewardFailure",
    "RewardFailureGuard",
    "RewardFn",
    "RewardOutput",
    "available_rewards",
    "build_reward",
    "build_rewards",
    "register_reward",
    "to_pil_images",
]
