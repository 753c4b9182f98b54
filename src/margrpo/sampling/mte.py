"""Multi-trajectory expectation (MAR-GRPO): which tokens are uncertain enough to be scored through K extra chains.

* `token_uncertainty`: std over K extra head trajectories of each token's final value (population std, as the
  reference code), averaged over channels.
* `top_fraction_mask`: per image, the `fraction` most uncertain tokens (at least one when fraction > 0), ties
  broken by position.

The sampler draws the chains and records, for the selected tokens only, their states and log-probabilities; the
objective averages the policy term over them (`margrpo.rl.objective`).
"""

from __future__ import annotations

import torch


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
