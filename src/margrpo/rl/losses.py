"""Per-element loss terms: the PPO-clipped surrogate and the KL to the reference policy.

Everything here is float32 and element-wise; reductions (per element or per token) happen in
`rl.objective`, where the masks are known.
"""

from __future__ import annotations

import torch

KL_MODES = ("gaussian", "reference")


MAX_LOG_RATIO = 20.0


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO loss per element, -min(rho A, clip(rho, 1-eps, 1+eps) A), and the ratio rho.

    `advantages` must broadcast against `logp`. With clip_eps <= 0 no clipping is applied (plain
    importance-weighted policy gradient). `dual_clip` = c > 1 also bounds the objective of negative
    advantages below by c A (dual-clip PPO), so one element whose ratio exploded cannot dominate the
    gradient. The log-ratio is clamped to +-20 before exponentiating: beyond that the element's
    gradient is zero anyway under clipping, and exp would overflow to inf and turn gradients into nan.
    """
    ratio = torch.exp((logp.float() - old_logp.float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * advantages
    if clip_eps <= 0:
        return -unclipped, ratio
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        objective = torch.where(advantages < 0, torch.maximum(objective, dual_clip * advantages), objective)
    return -objective, ratio


def gaussian_kl(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) element-wise, float32.

    With equal stds (frozen head) it is (mean_p - mean_q)^2 / (2 std^2), Flow-GRPO's analytic KL.
    """
    mp, sp, mq, sq = (t.float() for t in (mean_p, std_p, mean_q, std_q))
    return torch.log(sq / sp) + (sp**2 + (mp - mq) ** 2) / (2 * sq**2) - 0.5


def reference_code_kl(mean_policy: torch.Tensor, mean_ref: torch.Tensor) -> torch.Tensor:
    """The MAR-GRPO release's "KL": e^d - d - 1 with d = mu_ref - mu_theta, on means (no 1/s^2)."""
    d = mean_ref.float() - mean_policy.float()
    return torch.exp(d) - d - 1
