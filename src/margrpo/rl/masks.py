"""Token masks of MAR-GRPO: which tokens get the multi-trajectory term, which enter the policy loss.

* `token_uncertainty`: std over K extra head trajectories of each token's final value (population std,
  as the reference code), averaged over channels.
* `top_fraction_mask`: per image, the `fraction` most uncertain tokens (at least one when
  fraction > 0), ties broken by position.
* `consistency_mask`: for AR step i > i0, a still-unknown token is kept only if the step-i head output
  moved closer (cosine over channels) to the final token than the step-(i-1) output did
  (delta > tau); tokens committed at step i are always kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from margrpo.sampling.mte import token_uncertainty, top_fraction_mask

__all__ = ["consistency_mask", "cosine_to_final", "mask_fraction", "token_uncertainty", "top_fraction_mask"]


def cosine_to_final(values: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the channel dimension, [..., C] x [..., C] -> [...]."""
    return F.cosine_similarity(values.float(), final.float(), dim=-1, eps=1e-8)


def consistency_mask(step_values: torch.Tensor, prev_values: torch.Tensor, final: torch.Tensor,
                     committed: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Keep committed tokens, and unknown ones whose step output moved toward the final token.

    All inputs are aligned over the same tokens: step_values / prev_values / final [..., C],
    committed [...] bool. Returns bool [...].
    """
    delta = cosine_to_final(step_values, final) - cosine_to_final(prev_values, final)
    return committed | (delta > tau)


def mask_fraction(mask: torch.Tensor) -> float:
    n = mask.numel()
    return float(mask.float().sum() / n) if n else math.nan
