"""The loss of one scored AR step: PPO surrogate (+ MTE on uncertain tokens, consistency filter) + beta * KL.

Per scored element (token x channel x head step j), with rho = exp(logp_theta - logp_old):

    L_pg = -min(rho A, clip(rho, 1-eps, 1+eps) A)
    L    = reduce(L_pg over kept policy elements) + beta * reduce(KL(pi_theta || pi_ref) over all elements)

* MTE: on the top-k% most uncertain tokens, L_pg is the average over the K extra trajectories of the
  per-trajectory term, scored under this step's condition; elsewhere it is the main trajectory's term.
* Consistency: for AR steps i > i0, still-unknown tokens are kept only if their step-i head output moved
  closer to the final token than the step-(i-1) output did; committed tokens are always kept. The KL is
  never filtered and always uses the main trajectory.
* `reduce` is a mean over kept elements (`normalize="element"`) or a sum over channels and a mean over
  kept (token, step) pairs (`normalize="token"`, the Harmon reference convention).
* Estimator: `trajectory` (above, GRPO / DDPO) or `matching` (AWM): logp_theta is replaced per token by
  minus the head's pretraining loss on the token's final value at fixed random (noise level, noise)
  draws, so [J, N, C] becomes [draws, N, 1]; masks, reduction and KL are unchanged; MTE does not apply.
* Old log-probabilities: the rollout's own for the main trajectory under the rollout's guidance. Where
  the rollout recorded none (MTE trajectories, or `guidance="cond_only"`), the first evaluation in the
  rollout's first PPO epoch provides them (detached); with one optimizer step per rollout that is exactly
  the sampling policy, so rho = 1 before the first update in every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from margrpo.rl.losses import clipped_surrogate, gaussian_kl, reference_code_kl
from margrpo.rl.masks import consistency_mask, token_uncertainty, top_fraction_mask
from margrpo.sampling.replay import (
    ScoredTransitions,
    StepConditions,
    check_head_steps,
    score_transitions,
    step_conditions,
)
from margrpo.sampling.rollout import Rollout

ESTIMATORS = ("trajectory", "matching", "nft")

@dataclass
class ObjectiveConfig:
    clip_eps: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.01
    kl: str = "gaussian"  # "gaussian" | "reference"
    normalize: str = "element"  # "element" | "token"
    guidance: str = "rollout"  # "rollout" | "cond_only"
    head_step_weighting: str = "none"  # "none" | "std"
    mte_top_fraction: float = 0.3
    consistency: bool = True
    consistency_start: int = 1
    consistency_tau: float = 0.0
    estimator: str = "trajectory"  # "trajectory" | "matching" | "nft"
    noise_draws: int = 4
    nft_beta: float = 1.0
    nft_adv_clip: float = 5.0


@dataclass
class StepLoss:
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def _reduce(values: torch.Tensor, token_mask: torch.Tensor, normalize: str) -> tuple[torch.Tensor, float]:
    """values [J, N, C], token_mask [N] float -> scalar mean over kept elements (or kept tokens x steps)."""
    j, _, c = values.shape
    num = (values * token_mask[None, :, None]).sum()
    count = token_mask.sum() * j * (c if normalize == "element" else 1)
    if float(count) == 0:
        return values.sum() * 0.0, 0.0
    return num / count, float(count)


def _mte_trajectories(rollout: Rollout, step: int) -> torch.Tensor | None:
    """[K, T+1, N, C] extra trajectories aligned with this step's diffused tokens, or None."""
    rec = rollout.steps[step]
    if rec.mte_x is not None:
        return rec.mte_x
    if rollout.mte_x is None:
        return None
    flat = rec.diffused.reshape(-1).nonzero().flatten()
    return rollout.mte_x[:, :, flat]


def uncertain_tokens(rollout: Rollout, step: int, fraction: float) -> torch.Tensor | None:
    """[N] bool over this step's diffused tokens: the top `fraction` most uncertain per image."""
    rec = rollout.steps[step]
    b = rollout.batch_size
    if rollout.mte_x is not None and rec.mte_x is None:  # committing-condition chains: per image over all L
        u = token_uncertainty(rollout.mte_x[:, -1]).reshape(b, -1)
        return top_fraction_mask(u, fraction)[rec.diffused]
    traj = _mte_trajectories(rollout, step)
    if traj is None:
        return None
    u = token_uncertainty(traj[:, -1]).reshape(b, -1)  # per image over its diffused tokens
    return top_fraction_mask(u, fraction).reshape(-1)


def ar_step_loss(policy: torch.nn.Module, reference: torch.nn.Module | None, rollout: Rollout, step: int,
                 head_steps: list[int], advantages: torch.Tensor, use: torch.Tensor, cfg: ObjectiveConfig,
                 old_cache: dict, first_epoch: bool, generator: torch.Generator | None = None) -> StepLoss:
    """Loss of AR step `step` of `rollout` at head steps `head_steps` (see the module docstring).

    `advantages` [B] and `use` [B] (valid and informative samples) are per image. `old_cache` keeps, across
    PPO epochs, the old log-probabilities that the rollout did not record and the frozen reference's
    transitions (one reference forward per rollout instead of one per epoch).
    """
    check_head_steps(policy, rollout)
    if reference is not None:
        check_head_steps(reference, rollout)
    rec = rollout.steps[step]
    b = rollout.batch_size
    dev = rec.x.device
    n_tok = int(rec.diffused.sum())
    per_image = n_tok // b
    img = torch.arange(b, device=dev).repeat_interleave(per_image)
    committed = rec.committed_in_diffused()
    temperature = rollout.temperature
    js = list(head_steps)

    sc = step_conditions(policy, rollout, step, cfg.guidance)
    adv = advantages.to(dev).float()[img][None, :, None]
    stats: dict[str, float] = {}
    main = None
    if cfg.estimator not in ESTIMATORS:
        raise ValueError(f"estimator={cfg.estimator!r}; valid: {', '.join(map(repr, ESTIMATORS))}")
    if cfg.estimator == "matching":
        pg, ratio = matching_terms(policy.head, rollout.tokens[rec.diffused], sc.z, adv, cfg, old_cache,
                                   ("matching", step), first_epoch, generator)
    elif cfg.estimator == "nft":
        pg, nft_stats = nft_terms(policy.head, rollout.tokens[rec.diffused], sc.z, adv, cfg, old_cache,
                                  ("nft", step), first_epoch, generator)
        ratio = None
        stats.update(nft_stats)
    else:
        main = score_transitions(policy.head, rec.x, js, sc, temperature)
        key = ("main", step, tuple(js))
        if cfg.guidance == "rollout":
            old = rec.logp[js]
        else:
            if first_epoch and key not in old_cache:
                old_cache[key] = main.logp.detach()
            old = old_cache[key]
        pg, ratio = clipped_surrogate(main.logp, old, adv, cfg.clip_eps, cfg.dual_clip)
        pg = _with_mte(pg, policy, rollout, step, js, sc, adv, cfg, old_cache, first_epoch, stats)

    # ---------------- which tokens enter the policy term
    keep = use.to(dev)[img].clone()
    if cfg.consistency and step > cfg.consistency_start and (step - 1) in rollout.steps:
        prev = rollout.steps[step - 1]
        prev_vals = prev.final_values()[rec.diffused]
        final = rollout.tokens[rec.diffused]
        cons = consistency_mask(rec.x[-1], prev_vals, final, committed, cfg.consistency_tau)
        stats["mask/consistency_kept"] = float(cons.float().mean())
        keep &= cons
    stats["mask/policy_tokens"] = float(keep.float().mean())

    if cfg.head_step_weighting == "std":
        s = main.std.detach().mean(dim=(1, 2))
        pg = pg * (s / s.mean())[:, None, None]
    policy_loss, n_el = _reduce(pg, keep.float(), cfg.normalize)

    # ---------------- KL to the reference (main trajectory, all tokens)
    kl_loss = torch.zeros((), device=dev)
    if reference is not None and cfg.beta > 0:
        if main is None:
            main = score_transitions(policy.head, rec.x, js, sc, temperature)
        ref_key = ("reference", step, tuple(js))
        if ref_key not in old_cache:  # the reference is frozen: its transitions are the same in every epoch
            with torch.no_grad():
                old_cache[ref_key] = score_transitions(
                    reference.head, rec.x, js, step_conditions(reference, rollout, step, cfg.guidance), temperature)
        kl = kl_terms(main, old_cache[ref_key], cfg.kl)
        kl_loss, _ = _reduce(kl, torch.ones(n_tok, device=dev), cfg.normalize)
    loss = policy_loss + cfg.beta * kl_loss

    stats.update({"loss/policy": float(policy_loss.detach()), "loss/kl": float(kl_loss.detach()), "elements": n_el})
    if ratio is not None:
        with torch.no_grad():
            kept = keep[None, :, None].expand_as(ratio)
            r = ratio[kept] if bool(kept.any()) else ratio.reshape(-1)
            stats.update({
                "ratio/mean": float(r.mean()), "ratio/max": float(r.max()), "ratio/min": float(r.min()),
                "clip_fraction": float(((r - 1).abs() > cfg.clip_eps).float().mean()) if cfg.clip_eps > 0 else 0.0,
            })
    return StepLoss(loss=loss, stats=stats)


def _with_mte(pg: torch.Tensor, policy: torch.nn.Module, rollout: Rollout, step: int, js: list[int], sc: StepConditions,
              adv: torch.Tensor, cfg: ObjectiveConfig, old_cache: dict, first_epoch: bool,
              stats: dict[str, float]) -> torch.Tensor:
    """Replace the policy term of the top-k% most uncertain tokens by its average over the K extra trajectories."""
    traj = _mte_trajectories(rollout, step)
    if traj is None or cfg.mte_top_fraction <= 0:
        return pg
    unc_mask = uncertain_tokens(rollout, step, cfg.mte_top_fraction)
    idx = unc_mask.nonzero().flatten()
    stats["mte/token_fraction"] = float(unc_mask.float().mean())
    stats["mte/uncertainty_mean"] = float(token_uncertainty(traj[:, -1]).mean())
    if not len(idx):
        return pg
    terms = []
    for k in range(traj.shape[0]):
        st_k = score_transitions(policy.head, traj[k], js, sc, rollout.temperature, tokens=idx)
        key_k = ("mte", step, k, tuple(js))
        if first_epoch and key_k not in old_cache:
            old_cache[key_k] = st_k.logp.detach()
        pg_k, _ = clipped_surrogate(st_k.logp, old_cache[key_k], adv[:, idx], cfg.clip_eps, cfg.dual_clip)
        terms.append(pg_k)
    pg = pg.clone()
    pg[:, idx] = torch.stack(terms).mean(0)
    return pg


def matching_terms(head: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, adv: torch.Tensor,
                   cfg: ObjectiveConfig, old_cache: dict, key: tuple, first_epoch: bool,
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
    n = target.shape[0]
    m = cfg.noise_draws
    t = head.loss_noise_levels(stratified_uniform(m, n, generator, target.device).reshape(-1))
    loss = head.loss(target.float().repeat(m, 1), z.repeat(m, 1), generator=generator, t=t).float().reshape(m, n, 1)
    if key not in old_cache:
        if not first_epoch:
            raise RuntimeError(f"matching: no old loss cached for {key} after the first PPO epoch")
        old_cache[key] = loss.detach()
    return clipped_surrogate(-loss, -old_cache[key], adv, cfg.clip_eps, cfg.dual_clip)


def nft_terms(head: torch.nn.Module, target: torch.Tensor, z: torch.Tensor, adv: torch.Tensor, cfg: ObjectiveConfig,
              old_cache: dict, key: tuple, first_epoch: bool, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117) on each token's final value, through z (head frozen).

    Rewards become an optimality probability r = clamp(A / A_max, -1, 1) / 2 + 1/2 (A_max = `nft_adv_clip`).
    With e_theta and e_old the head's regression errors (`DiffusionHead.regression_error`) under the current z
    and under the rollout's (cached in the first PPO epoch, as the matching estimator's old loss), the implicit
    positive and negative policies have errors

        e+ = beta e_theta + (1 - beta) e_old,      e- = (1 + beta) e_old - beta e_theta      (beta = `nft_beta`)

    and the per-token loss is [r |e+|^2 / w+ + (1 - r) |e-|^2 / w-] / beta, with |.|^2 a mean over channels and
    w = mean |e| (detached, at least 1e-5: the release's adaptive weighting). At theta = old its gradient is
    (A / A_max) grad(|e_theta|^2) / w: the advantage-weighted denoising loss; positive samples are fitted, negative
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

    def adaptive(e: torch.Tensor) -> torch.Tensor:
        w = e.detach().abs().mean(dim=-1, keepdim=True).clamp(min=1e-5)
        return (e**2 / w).mean(dim=-1, keepdim=True)

    loss = (r * adaptive(pos) + (1 - r) * adaptive(neg)) / beta
    with torch.no_grad():
        stats = {"nft/old_deviation": float(((err - old) ** 2).mean()), "nft/r_mean": float(r.mean())}
    return loss, stats


def stratified_uniform(m: int, n: int, generator: torch.Generator | None,
                       device: torch.device | str) -> torch.Tensor:
    """[m, n] uniforms in [0, 1): row k lies in [k/m, (k+1)/m), independently per column."""
    u = torch.rand((m, n), generator=generator, device=device)
    return (torch.arange(m, device=device, dtype=u.dtype)[:, None] + u) / m


def kl_terms(policy: ScoredTransitions, ref: ScoredTransitions, mode: str) -> torch.Tensor:
    if mode == "gaussian":
        return gaussian_kl(policy.mean, policy.std, ref.mean, ref.std)
    if mode == "reference":
        return reference_code_kl(policy.mean, ref.mean)
    raise ValueError(f"kl={mode!r}; valid: 'gaussian', 'reference'")
