"""Per-element terms of the loss (`rl/loss.py` masks, reduces and sums them): the PPO-clipped surrogate and its
ratios' statistics, the KL to the reference, and the forward-process estimators' per-draw terms.

* `matching_terms`: advantage-weighted matching (AWM, Xue et al. 2025), the PPO surrogate on minus the head's
  training loss on each token's final value;
* `nft_terms`: DiffusionNFT (Zheng et al. 2025), the negative-aware loss through implicit positive and negative
  policies.

Both take stratified noise levels (`stratified_uniform`) drawn from a generator that gives the same draws in every
PPO epoch, and cache the rollout's ("old") terms in the first epoch. Everything here is float32 and element-wise.
"""

from __future__ import annotations

import torch

from margrpo.models.heads import ScoredTransitions
from margrpo.rl.config import AlgorithmSection

MAX_LOG_RATIO = 20.0


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO loss per element, -min(rho A, clip(rho, 1-eps, 1+eps) A), and the ratio rho (float32).

    `advantages` must broadcast against `logp`. With clip_eps <= 0 no clipping is applied (plain importance-weighted
    policy gradient). The log-ratio is clamped to +-20 before exponentiating: exp would overflow to inf and turn
    gradients into nan.
    """
    ratio = torch.exp((logp.float() - old_logp.float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * advantages
    if clip_eps <= 0:
        return -unclipped, ratio
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
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


def ratio_stats(ratio: torch.Tensor, keep: torch.Tensor, clip_eps: float) -> dict[str, float]:
    """Mean, max, min and clipped share of the PPO ratios [M, N, 1] of the kept tokens `keep` [N] (all if none)."""
    with torch.no_grad():
        kept = keep[None, :, None].expand_as(ratio)
        r = ratio[kept] if bool(kept.any()) else ratio.reshape(-1)
        return {"ratio/mean": float(r.mean()), "ratio/max": float(r.max()), "ratio/min": float(r.min()),
                "clip_fraction": float(((r - 1).abs() > clip_eps).float().mean()) if clip_eps > 0 else 0.0}


def kl_terms(policy: ScoredTransitions, ref: ScoredTransitions, mode: str) -> torch.Tensor:
    if mode == "gaussian":
        return gaussian_kl(policy.mean, policy.std, ref.mean, ref.std)
    if mode == "reference":
        return reference_code_kl(policy.mean, ref.mean)
    raise ValueError(f"kl={mode!r}; valid: 'gaussian', 'reference'")


def matching_terms(head: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, adv: torch.Tensor,
                   cfg: AlgorithmSection, old_cache: dict, key: tuple, first_epoch: bool,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage-weighted matching (AWM, Xue et al. 2025): the PPO surrogate on the head's pretraining loss.

    Per token, -loss(final value | z) at `matching_draws` random (noise level, noise) draws stands in for
    log p(token | z), so rho = exp(loss_old - loss_theta) and, at rho = 1, the gradient is that of
    mean(A * loss): the pretraining objective weighted by the advantage. Why: the trajectory estimator's
    score terms carry every head step's sampling noise (AWM shows DDPO is score matching on noisy
    targets); the denoising loss on the committed value does not. The noise levels are stratified: a
    token's m draws take one u from each [k/m, (k+1)/m), mapped through the head's training distribution
    (`loss_noise_levels`); the expected loss is unchanged and its variance lower (measured on the shipped
    base: the mean cosine between 128-image gradients rose from 0.036 to 0.046 at 4 draws).
    `generator` must give the same draws in every PPO epoch (the trainer derives it from the step), so
    rho = 1 before the first update.
    Returns ([M, N, 1] per-draw terms, ratio).
    """
    loss = stratified_denoising_loss(head, target, z, cfg.noise_draws, generator).unsqueeze(-1)
    if key not in old_cache:
        if not first_epoch:
            raise RuntimeError(f"matching: no old loss cached for {key} after the first PPO epoch")
        old_cache[key] = loss.detach()
    return clipped_surrogate(-loss, -old_cache[key], adv, cfg.clip_eps)


def stratified_denoising_loss(head: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, draws: int,
                              generator: torch.Generator | None) -> torch.Tensor:
    """[draws, N] float32: the head's pretraining loss on each token's value `target` [N, C] under z [N, D], at
    `draws` (noise level, noise) draws per token with stratified levels (`stratified_uniform` mapped through the
    head's training distribution): the matching estimator's per-draw term."""
    n = target.shape[0]
    t = head.loss_noise_levels(stratified_uniform(draws, n, generator, target.device).reshape(-1))
    return head.loss(target.float().repeat(draws, 1), z.repeat(draws, 1), generator=generator,
                     t=t).float().reshape(draws, n)


def nft_terms(head: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, adv: torch.Tensor, cfg: AlgorithmSection,
              old_cache: dict, key: tuple, first_epoch: bool, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on each token's final value, through z (head frozen).

    Rewards become an optimality probability r = clamp(A / A_max, -1, 1) / 2 + 1/2 (A_max = `nft_adv_clip`).
    With e_theta and e_old the head's regression errors (`DiffusionHead.regression_error`) under the current z
    and under the rollout's (cached in the first PPO epoch, as the matching estimator's old loss), the implicit
    positive and negative policies have errors

        e+ = beta e_theta + (1 - beta) e_old,      e- = (1 + beta) e_old - beta e_theta      (beta = `nft_beta`)

    and the per-token loss is [r |e+|^2 / w+ + (1 - r) |e-|^2 / w-] / beta, with |.|^2 a mean over channels and
    w = mean |e| (detached, at least 1e-5: the release's adaptive weighting). At
    theta = old its gradient is (A / A_max) grad(|e_theta|^2) / w: the advantage-weighted denoising loss;
    positive samples are fitted, negative
    ones pushed away, and beta sets how far the implicit policies extrapolate. Noise levels are stratified as in
    `matching_terms`, with `noise_draws` draws per token and the same draws in every epoch.
    Returns ([M, N, 1] per-draw losses, stats).
    """
    n, c = target.shape
    m = cfg.noise_draws
    t = head.loss_noise_levels(stratified_uniform(m, n, generator, target.device).reshape(-1))
    noise = torch.randn((m * n, c), generator=generator, device=target.device, dtype=torch.float32)
    err = head.regression_error(target.float().repeat(m, 1), z.repeat(m, 1), t, noise).reshape(m, n, c)
    if key not in old_cache:
        if not first_epoch:
            raise RuntimeError(f"nft: no old prediction cached for {key} after the first PPO epoch")
        old_cache[key] = err.detach()
    old = old_cache[key]
    beta = cfg.nft_beta
    r = (adv.float().clamp(-cfg.nft_adv_clip, cfg.nft_adv_clip) / cfg.nft_adv_clip / 2 + 0.5).clamp(0, 1)
    pos = beta * err + (1 - beta) * old
    neg = (1 + beta) * old - beta * err

    def weighted(e: torch.Tensor) -> torch.Tensor:  # squared error over its detached mean absolute error
        return (e**2).mean(dim=-1, keepdim=True) / e.detach().abs().mean(dim=-1, keepdim=True).clamp(min=1e-5)

    loss = (r * weighted(pos) + (1 - r) * weighted(neg)) / beta
    with torch.no_grad():
        stats = {"nft/old_deviation": float(((err - old) ** 2).mean()), "nft/r_mean": float(r.mean())}
    return loss, stats


def stratified_uniform(m: int, n: int, generator: torch.Generator | None,
                       device: torch.device | str) -> torch.Tensor:
    """[m, n] uniforms in [0, 1): row k lies in [k/m, (k+1)/m), independently per column."""
    u = torch.rand((m, n), generator=generator, device=device)
    return (torch.arange(m, device=device, dtype=u.dtype)[:, None] + u) / m
