"""Multi-trajectory expectation (MAR-GRPO): which tokens are uncertain enough to be scored through K extra chains.

* `token_uncertainty`: std over K extra head trajectories of each token's final value (population std, as the
  reference code), averaged over channels.
* `top_fraction_mask`: per image, the `fraction` most uncertain tokens (at least one when fraction > 0), ties
  broken by position.

The sampler draws the chains (`DiffusionHead.sample_chains`, from each token's committing z or per recorded
step) and records, for the selected tokens only, their states and log-probabilities (`record_mte`); the loss
averages the policy term over them (`margrpo.rl.loss`).
"""

from __future__ import annotations

import torch

from margrpo.models.heads import DiffusionHead
from margrpo.sampling.config import RecordPlan
from margrpo.sampling.rollout import ARStepRecord


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


def record_mte(rec: ARStepRecord, head: DiffusionHead, chains: torch.Tensor, uncertain: torch.Tensor,
               scoring: tuple[torch.Tensor, torch.Tensor | None, float], plan: RecordPlan, temperature: float) -> None:
    """Keep the K chains [K, T+1, N, C] of a step's `uncertain` tokens and their log-probabilities under the
    step's scoring z, at the head steps the trainer will score: what replay reads, nothing more."""
    if plan.head_steps is not None and rec.ar_step not in plan.head_steps:
        return  # recorded for another reason (the consistency mask of the next step), never scored
    js = (list(plan.head_steps[rec.ar_step]) if plan.head_steps is not None
          else [j for j in range(head.num_steps) if head.is_stochastic(j)])
    idx = uncertain.nonzero().flatten()
    z, zu, guidance = scoring
    z, zu = z[idx], zu[idx] if zu is not None else None
    rec.mte_tokens = idx
    rec.mte_head_steps = js
    rec.mte_x = chains[:, :, idx]
    rec.mte_logp = (chain_log_probs(head, rec.mte_x, js, z, zu, guidance, temperature)
                    if len(idx) and js else None)


def chain_log_probs(head: DiffusionHead, chains: torch.Tensor, js: list[int], z: torch.Tensor,
                    z_uncond: torch.Tensor | None, guidance: float, temperature: float) -> torch.Tensor:
    """Log-probabilities [K, J, n, C] of K chains' transitions [K, T+1, n, C] at head steps `js`, in one head call
    per step: the chain axis broadcasts over the n tokens' z (computed once)."""
    return head.score_transitions(chains.transpose(0, 1), js, z, z_uncond, guidance, temperature).logp.transpose(0, 1)
