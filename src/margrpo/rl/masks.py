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


def token_uncertainty(final_values: torch.Tensor) -> torch.Tensor:
    """final_values [K, ..., C] -> [...]: std over K (population), mean over channels."""
    if final_values.shape[0] < 2:
        raise ValueError(f"uncertainty needs at least 2 trajectories, got K={final_values.shape[0]}")
    return final_values.float().std(dim=0, unbiased=False).mean(dim=-1)


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """scores [B, n] -> bool [B, n] marking the top `int(n * fraction)` per row (>= 1 if fraction > 0)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    b, n = scores.shape
    k = int(n * fraction)
    if fraction > 0:
        k = max(1, k)
    mask = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    if k == 0:
        return mask
    # stable tie-break: sort by (score desc, position asc)
    order = torch.argsort(-scores.float(), dim=1, stable=True)
    mask.scatter_(1, order[:, :k], True)
    return mask


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
