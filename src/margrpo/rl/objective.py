"""The loss of one scored AR step: PPO surrogate (+ MTE on uncertain tokens, consistency filter) + beta * KL.

Per scored element (token x channel x head step j), with rho = exp(logp_theta - logp_old):

    L_pg = -min(rho A, clip(rho, 1-eps, 1+eps) A)
    L    = reduce(L_pg over kept policy elements) + beta * reduce(KL(pi_theta || pi_ref) over all elements)

* MTE: on the top-k% most uncertain tokens, L_pg is the average over the K extra trajectories of the
  per-trajectory term, scored under this step's condition; elsewhere it is the main trajectory's term.
* Consistency: for AR steps i > i0, still-unknown tokens are kept only if their step-i head output moved
  closer to the final token than the step-(i-1) output did; committed tokens are always kept. The KL is
  never filtered and always uses the main trajectory.
* The ratio is taken per element (`ratio_level="element"`, the paper's), or its log is pooled per token (mean
  over channels) or per image (mean over the image's kept elements, as Flow-GRPO and DanceGRPO pool per image
  and timestep) before the clip, so one element with a huge ratio cannot keep the unclipped branch alone.
* `reduce` is, per AR step, a mean over kept elements (`normalize="element"`) or a sum over channels and a
  mean over kept (token, step) pairs (`normalize="token"`, the Harmon reference convention); the trainer then
  averages the AR steps. `normalize="rollout"` instead divides every AR step's kept sum by the kept (token,
  head step) pairs of the whole rollout: a token weighs the same whichever step committed it (a mean per AR
  step gives the one or two tokens of the first steps several times the weight of later ones). The KL is
  always a mean per AR step.
* Estimator: `trajectory` (above, GRPO / DDPO), `matching` (AWM, `forward_process.py`: logp_theta is replaced
  per token by minus the head's pretraining loss on the token's final value at fixed random (noise level,
  noise) draws, so [J, N, C] becomes [draws, N, 1]) or `nft` (DiffusionNFT's negative-aware loss on the final
  value, no ratio).
  Masks, reduction and KL are the same for all three; MTE applies to `trajectory` only.
* Old log-probabilities are the rollout's own, recorded at sampling time: the main trajectory's under the
  density the loss scores (the guided one, or the conditional branch alone for `score_guidance="cond_only"`) and
  the MTE chains' under this step's scoring conditions. So rho = 1 before the first update is a check of
  replay against sampling, not a copy of one evaluation. The forward-process estimators' old losses come from
  the first PPO epoch (the rollout has none); the frozen reference's transitions are cached across epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from margrpo.models.base import Policy
from margrpo.rl.forward_process import matching_terms, nft_terms
from margrpo.rl.losses import MAX_LOG_RATIO, clipped_surrogate, gaussian_kl, reference_code_kl
from margrpo.rl.masks import consistency_mask, token_uncertainty
from margrpo.sampling.replay import (
    ScoredTransitions,
    StepConditions,
    check_head_steps,
    score_transitions,
    step_conditions,
)
from margrpo.sampling.rollout import ARStepRecord, Rollout

ESTIMATORS = ("trajectory", "matching", "nft")
RATIO_LEVELS = ("element", "token", "image")
NORMALIZE_MODES = ("element", "token", "rollout")

@dataclass
class ObjectiveConfig:
    clip_eps: float = 0.2
    dual_clip: float | None = None
    beta: float = 0.01
    kl: str = "gaussian"  # "gaussian" | "reference"
    normalize: str = "element"  # "element" | "token" | "rollout"
    score_guidance: str = "rollout"  # "rollout" | "cond_only"
    head_step_weighting: str = "none"  # "none" | "std"
    mte_top_fraction: float = 0.3
    consistency: bool = True
    consistency_start: int = 1
    consistency_tau: float = 0.0
    ratio_level: str = "element"  # "element" | "token" | "image" (trajectory estimator)
    estimator: str = "trajectory"  # "trajectory" | "matching" | "nft"
    noise_draws: int = 4
    nft_beta: float = 1.0
    nft_adv_clip: float = 5.0
    nft_weighting: str = "adaptive"  # "adaptive" | "mse"
    # > 0: the trajectory estimator's head terms (main trajectory and each of the K MTE chains) are scored
    # `chunk_head_steps` head steps at a time, each chunk back-propagated at once into the step's conditions
    # (`chunked_trajectory_loss`); 0 = one graph for everything
    chunk_head_steps: int = 0


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


def kept_policy_tokens(rollout: Rollout, step: int, use: torch.Tensor, cfg: ObjectiveConfig,
                  stats: dict[str, float] | None = None) -> torch.Tensor:
    """[N] bool over AR step `step`'s diffused tokens: those that enter the policy term.

    A token's image must carry signal (`use` [B]); with the consistency filter, a still-unknown token must have
    moved toward its final value since the previous step (committed tokens always stay).
    """
    rec = rollout.steps[step]
    b = rollout.batch_size
    img = torch.arange(b, device=rec.x.device).repeat_interleave(int(rec.diffused.sum()) // b)
    keep = use.to(rec.x.device)[img].clone()
    if cfg.consistency and step > cfg.consistency_start and (step - 1) in rollout.steps:
        prev_vals = rollout.steps[step - 1].final_values()[rec.diffused]
        final = rollout.tokens[rec.diffused]
        cons = consistency_mask(rec.x[-1], prev_vals, final, rec.committed_in_diffused(), cfg.consistency_tau)
        keep &= cons
        if stats is not None:
            stats["mask/consistency_kept"] = float(cons.float().mean())
    if stats is not None:
        stats["mask/policy_tokens"] = float(keep.float().mean())
    return keep


def ar_step_loss(policy: Policy, reference: Policy | None, rollout: Rollout, step: int,
                 head_steps: list[int], advantages: torch.Tensor, use: torch.Tensor, cfg: ObjectiveConfig,
                 old_cache: dict, first_epoch: bool, generator: torch.Generator | None = None,
                 policy_denominator: float | None = None, conditions: StepConditions | None = None,
                 reference_conditions: StepConditions | None = None, policy_weight: float = 1.0) -> StepLoss:
    """Loss of AR step `step` of `rollout` at head steps `head_steps` (see the module docstring).

    `policy_weight` multiplies the policy term (not the KL) in the returned loss: a distributed trainer weighs each
    rank's mean by its share of the global batch's kept elements, so that the ranks' averaged gradient is the
    gradient of the mean over the global batch (`stats` keep the unweighted value).

    `advantages` [B] and `use` [B] (valid and informative samples) are per image. `old_cache` keeps, across
    PPO epochs, the forward-process estimators' old losses and the frozen reference's transitions (one
    reference forward per rollout instead of one per epoch). `conditions` / `reference_conditions` are this
    step's z when the caller computed several steps in one call (`replay.batched_step_conditions`).
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
    temperature = rollout.temperature
    js = list(head_steps)

    sc = conditions if conditions is not None else step_conditions(policy, rollout, step, cfg.score_guidance)
    adv = advantages.to(dev).float()[img][None, :, None]
    stats: dict[str, float] = {}
    main = None
    keep = kept_policy_tokens(rollout, step, use, cfg, stats)
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
    elif cfg.chunk_head_steps > 0:
        return chunked_trajectory_loss(policy, reference, rollout, step, js, adv, keep, sc, cfg, old_cache,
                                       policy_denominator, stats, reference_conditions, policy_weight)
    else:
        main = score_transitions(policy.head, rec.x, js, sc, temperature)
        # old log-probabilities: the rollout's own, under the density the loss scores
        if cfg.score_guidance == "cond_only" and rollout.guidance_scale != 1.0:
            if rec.logp_cond is None:
                raise ValueError("score_guidance='cond_only' scores the conditional branch, but the rollout recorded "
                                 "no log-probabilities for it (sample with SamplerConfig.score_guidance='cond_only')")
            old = rec.logp_cond[js]
        else:
            old = rec.logp[js]
        mte = _mte_log_probs(policy, rec, js, sc, temperature, stats) if cfg.mte_top_fraction > 0 else None
        if cfg.ratio_level == "element":
            pg, ratio = clipped_surrogate(main.logp, old, adv, cfg.clip_eps, cfg.dual_clip)
            if mte is not None:  # the uncertain tokens' term: the mean of their K chains' surrogates
                idx, new_k, old_k = mte
                pg = pg.clone()
                pg[:, idx] = torch.stack([clipped_surrogate(n_, o_, adv[:, idx], cfg.clip_eps, cfg.dual_clip)[0]
                                          for n_, o_ in zip(new_k, old_k, strict=True)]).mean(0)
        else:
            log_ratio = main.logp - old
            if mte is not None:  # the uncertain tokens' log-ratio: the mean of their K chains'
                idx, new_k, old_k = mte
                log_ratio = log_ratio.clone()
                log_ratio[:, idx] = (new_k - old_k).mean(0)
            pg, ratio = pooled_surrogate(log_ratio, keep, img, b, advantages.to(dev).float(), cfg)
            if cfg.normalize == "token":  # Harmon's sum over channels: the pooled value stands for C elements
                pg = pg * log_ratio.shape[-1]

    if cfg.head_step_weighting == "std":
        s = main.std.detach().mean(dim=(1, 2))
        pg = pg * (s / s.mean())[:, None, None]
    if cfg.normalize == "rollout":
        if policy_denominator is None:
            raise ValueError("normalize='rollout' divides by the rollout's kept (token, head step) pairs: pass "
                             "policy_denominator (the trainer computes it with kept_policy_tokens)")
        policy_loss = (pg.mean(dim=-1) * keep.float()[None, :]).sum() / policy_denominator
        n_el = float(keep.sum()) * pg.shape[0]
    else:
        policy_loss, n_el = _reduce(pg, keep.float(), cfg.normalize)

    # ---------------- KL to the reference (main trajectory, all tokens)
    kl_loss = torch.zeros((), device=dev)
    if reference is not None and cfg.beta > 0:
        if main is None:
            main = score_transitions(policy.head, rec.x, js, sc, temperature)
        ref_key = ("reference", step, tuple(js))
        if ref_key not in old_cache:  # the reference is frozen: its transitions are the same in every epoch
            with torch.no_grad():
                ref_sc = (reference_conditions if reference_conditions is not None
                          else step_conditions(reference, rollout, step, cfg.score_guidance))
                old_cache[ref_key] = score_transitions(reference.head, rec.x, js, ref_sc, temperature)
        kl = kl_terms(main, old_cache[ref_key], cfg.kl)
        kl_loss, _ = _reduce(kl, torch.ones(n_tok, device=dev), "token" if cfg.normalize == "token" else "element")
    loss = (policy_loss if policy_weight == 1.0 else policy_weight * policy_loss) + cfg.beta * kl_loss

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


def _old_main_log_probs(rollout: Rollout, rec: ARStepRecord, js: list[int], cfg: ObjectiveConfig) -> torch.Tensor:
    if cfg.score_guidance == "cond_only" and rollout.guidance_scale != 1.0:
        if rec.logp_cond is None:
            raise ValueError("score_guidance='cond_only' scores the conditional branch, but the rollout recorded "
                             "no log-probabilities for it (sample with SamplerConfig.score_guidance='cond_only')")
        return rec.logp_cond[js]
    return rec.logp[js]


def chunked_trajectory_loss(policy: Policy, reference: Policy | None, rollout: Rollout, step: int, js: list[int],
                            adv: torch.Tensor, keep: torch.Tensor, sc: StepConditions, cfg: ObjectiveConfig,
                            old_cache: dict, policy_denominator: float | None, stats: dict[str, float],
                            reference_conditions: StepConditions | None = None,
                            policy_weight: float = 1.0) -> StepLoss:
    """The trajectory estimator's loss of one AR step with the head graphs of one chunk alive at a time.

    Why: MTE scores K extra chains of the uncertain tokens at every scored head step; in one graph the head
    activations of all (1 + K) x J transitions are alive at the backward, so peak memory grows with K and J.
    The loss is a sum over (trajectory, head step) terms with weights known in advance (the element-level ratio,
    the kept-token masks and the reduction's counts), so each chunk -- the main trajectory's terms, or the K MTE
    chains' terms on the uncertain tokens (one head call), at `chunk_head_steps` head steps -- is differentiated
    alone (`torch.autograd.grad`) into the step's conditions z (and the head's trainable weights) and its graph
    freed. The returned loss has the unchunked value and, through
    `(z * dL/dz).sum()` (+ the same for the head weights; those terms are exactly 0 in value), the unchunked
    gradient up to float summation order, for the caller's backward through the transformer.
    Needs `ratio_level='element'` and `head_step_weighting='none'` (both couple head steps or chains nonlinearly).
    `policy_weight` multiplies the policy term (not the KL) as in `ar_step_loss`; `stats` keep the unweighted value.
    """
    if cfg.ratio_level != "element" or cfg.head_step_weighting != "none":
        raise ValueError("chunk_head_steps > 0 needs ratio_level='element' and head_step_weighting='none' (pooled "
                         "ratios and std weights couple the chunks)")
    rec = rollout.steps[step]
    dev = rec.x.device
    temperature = rollout.temperature
    n_tok, c = rec.x.shape[1], rec.x.shape[2]
    n_j = len(js)
    keep_f = keep.float()
    # per-token weight of a (head step, channel) element of the policy term
    if cfg.normalize == "rollout":
        if policy_denominator is None:
            raise ValueError("normalize='rollout' divides by the rollout's kept (token, head step) pairs: pass "
                             "policy_denominator (the trainer computes it with kept_policy_tokens)")
        count = float(policy_denominator) * c
        n_el = float(keep.sum()) * n_j
    else:
        count = float(keep_f.sum()) * n_j * (c if cfg.normalize == "element" else 1)
        n_el = count
    w = keep_f / count if count > 0 else torch.zeros_like(keep_f)
    mte = None
    if cfg.mte_top_fraction > 0 and rec.mte_x is not None:
        idx = rec.mte_tokens
        stats["mte/token_fraction"] = len(idx) / max(1, n_tok)
        stats["mte/uncertainty_mean"] = float(token_uncertainty(rec.mte_x[:, -1]).mean()) if len(idx) else 0.0
        if len(idx):
            missing = sorted(set(js) - set(rec.mte_head_steps))
            if missing:
                raise ValueError(f"AR step {rec.step}: the rollout recorded MTE log-probabilities at head steps "
                                 f"{rec.mte_head_steps}, not at {missing} (sample with SamplerConfig.mte_head_steps)")
            mte = (idx, rec.mte_logp[:, [rec.mte_head_steps.index(j) for j in js]])
    w_main = w
    if mte is not None:
        w_main = w.clone()
        w_main[mte[0]] = 0.0
    old = _old_main_log_probs(rollout, rec, js, cfg)
    use_kl = reference is not None and cfg.beta > 0
    if use_kl:
        ref_key = ("reference", step, tuple(js))
        if ref_key not in old_cache:
            with torch.no_grad():
                ref_sc = (reference_conditions if reference_conditions is not None
                          else step_conditions(reference, rollout, step, cfg.score_guidance))
                old_cache[ref_key] = score_transitions(reference.head, rec.x, js, ref_sc, temperature)
        ref = old_cache[ref_key]
        kl_count = n_tok * n_j * (1 if cfg.normalize == "token" else c)

    z = sc.z.detach().requires_grad_(True)
    zu = sc.z_uncond.detach().requires_grad_(True) if sc.z_uncond is not None else None
    leaf_sc = StepConditions(z=z, z_uncond=zu, guidance=sc.guidance, z_full=sc.z_full)
    head_params = [p for p in policy.head.parameters() if p.requires_grad]
    leaves = [z, *([zu] if zu is not None else []), *head_params]
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    zero = torch.zeros((), device=dev)
    policy_value, kl_value = zero, zero
    kept = keep[None, :, None]
    r_sum, r_n, r_max, r_min, r_clip = zero, 0, None, None, zero
    mte_max, mte_min = None, None

    def accumulate(term: torch.Tensor) -> None:
        for k, g in enumerate(torch.autograd.grad(term, leaves, allow_unused=True)):
            if g is not None:
                grads[k] = g if grads[k] is None else grads[k] + g

    size = cfg.chunk_head_steps
    for c0 in range(0, n_j, size):
        jc = js[c0:c0 + size]
        main = score_transitions(policy.head, rec.x, jc, leaf_sc, temperature)
        pg, ratio = clipped_surrogate(main.logp, old[c0:c0 + size], adv, cfg.clip_eps, cfg.dual_clip)
        pol = (pg * w_main[None, :, None]).sum()
        term = pol if policy_weight == 1.0 else policy_weight * pol
        if use_kl:
            kl = kl_terms(main, ScoredTransitions(js=jc, mean=ref.mean[c0:c0 + size], std=ref.std[c0:c0 + size],
                                                  logp=ref.logp[c0:c0 + size]), cfg.kl).sum() / kl_count
            term = term + cfg.beta * kl
            kl_value = kl_value + kl.detach()
        accumulate(term)
        policy_value = policy_value + pol.detach()
        with torch.no_grad():
            r = ratio[kept.expand_as(ratio)] if bool(keep.any()) else ratio.reshape(-1)
            r_sum, r_n = r_sum + r.sum(), r_n + r.numel()
            r_max = r.max() if r_max is None else torch.maximum(r_max, r.max())
            r_min = r.min() if r_min is None else torch.minimum(r_min, r.min())
            r_clip = r_clip + ((r - 1).abs() > cfg.clip_eps).float().sum()
        del main, pg, ratio, pol, term
        if mte is not None:
            # the K chains of the uncertain tokens together: their conditioning is computed once per token
            idx, old_k = mte
            k_chains = rec.mte_x.shape[0]
            new = score_transitions(policy.head, rec.mte_x.transpose(0, 1), jc, leaf_sc, temperature,
                                    tokens=idx).logp.transpose(0, 1)
            old_c = old_k[:, c0:c0 + size]
            pg_k = clipped_surrogate(new, old_c, adv[:, idx][None], cfg.clip_eps, cfg.dual_clip)[0]
            pol = (pg_k * w[idx][None, None, :, None]).sum() / k_chains
            accumulate(pol if policy_weight == 1.0 else policy_weight * pol)
            policy_value = policy_value + pol.detach()
            with torch.no_grad():
                rk = torch.exp((new - old_c).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
                mte_max = rk.max() if mte_max is None else torch.maximum(mte_max, rk.max())
                mte_min = rk.min() if mte_min is None else torch.minimum(mte_min, rk.min())
            del new, pg_k, pol
    # the loss: the chunks' value, and the gradient they left on z (and the head) for the caller's backward
    loss = (policy_value if policy_weight == 1.0 else policy_weight * policy_value) + cfg.beta * kl_value
    sources = [sc.z, *([sc.z_uncond] if zu is not None else []), *head_params]
    for src, g in zip(sources, grads, strict=True):
        if g is not None and src.requires_grad:
            loss = loss + (src * g).sum() - (src.detach() * g).sum()
    if mte is not None and mte_max is not None:
        stats["mte/ratio_max"], stats["mte/ratio_min"] = float(mte_max), float(mte_min)
    stats.update({"loss/policy": float(policy_value), "loss/kl": float(kl_value), "elements": n_el})
    if r_n:
        stats.update({"ratio/mean": float(r_sum / r_n), "ratio/max": float(r_max), "ratio/min": float(r_min),
                      "clip_fraction": float(r_clip / r_n) if cfg.clip_eps > 0 else 0.0})
    return StepLoss(loss=loss, stats=stats)


def _mte_log_probs(policy: Policy, rec: ARStepRecord, js: list[int], sc: StepConditions,
                   temperature: float, stats: dict[str, float]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The recorded uncertain tokens' K extra chains: (token indices, new log-probs, old log-probs [K, J, n, C]).

    The rollout chose the tokens and recorded the chains' log-probabilities under this step's scoring conditions
    (`sampling.mte.record_mte`): those are the old log-probabilities, so rho = 1 before the first update holds
    here too, and a replay that recomputed anything differently would show in `mte/ratio_*`.
    """
    if rec.mte_x is None:
        return None
    idx = rec.mte_tokens
    stats["mte/token_fraction"] = len(idx) / max(1, int(rec.diffused.sum()))
    stats["mte/uncertainty_mean"] = float(token_uncertainty(rec.mte_x[:, -1]).mean()) if len(idx) else 0.0
    if not len(idx):
        return None
    missing = sorted(set(js) - set(rec.mte_head_steps))
    if missing:
        raise ValueError(f"AR step {rec.step}: the rollout recorded MTE log-probabilities at head steps "
                         f"{rec.mte_head_steps}, not at {missing} (sample with SamplerConfig.mte_head_steps)")
    rows = [rec.mte_head_steps.index(j) for j in js]
    # the K chains in one head call per step (the chain axis leads the token axis), as the sampler recorded them
    new = score_transitions(policy.head, rec.mte_x.transpose(0, 1), js, sc, temperature,
                            tokens=idx).logp.transpose(0, 1)
    old = rec.mte_logp[:, rows]
    with torch.no_grad():
        r = torch.exp((new - old).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
        stats["mte/ratio_max"], stats["mte/ratio_min"] = float(r.max()), float(r.min())
    return idx, new, old


def pooled_surrogate(log_ratio: torch.Tensor, keep: torch.Tensor, img: torch.Tensor, num_images: int,
                     advantages: torch.Tensor, cfg: ObjectiveConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO surrogate with the log-ratio pooled per token (mean over channels) or per image (mean over its kept
    tokens' elements), as Flow-GRPO and DanceGRPO pool per image and timestep; one ratio and one clip per unit.

    log_ratio [J, N, C], keep [N] bool, img [N] image of each token, advantages [B]. Returns the per-token
    values [J, N, 1] (an image's value repeated on each of its tokens, so that reducing over kept tokens weighs
    images by their kept tokens) and the ratios ([J, N, 1] or [J, B]).
    """
    per_token = log_ratio.mean(dim=-1, keepdim=True)
    if cfg.ratio_level == "token":
        return clipped_surrogate(per_token, torch.zeros_like(per_token), advantages[img][None, :, None],
                                 cfg.clip_eps, cfg.dual_clip)
    if cfg.ratio_level != "image":
        raise ValueError(f"ratio_level={cfg.ratio_level!r}; valid: {', '.join(map(repr, RATIO_LEVELS))}")
    w = keep.float()
    sums = torch.zeros(per_token.shape[0], num_images, device=log_ratio.device).index_add(
        1, img, per_token[..., 0] * w)
    counts = torch.zeros(num_images, device=log_ratio.device).index_add(0, img, w).clamp(min=1)
    per_image = sums / counts
    pg, ratio = clipped_surrogate(per_image, torch.zeros_like(per_image), advantages[None, :], cfg.clip_eps,
                                  cfg.dual_clip)
    return pg[:, img, None], ratio[:, img, None]


def kl_terms(policy: ScoredTransitions, ref: ScoredTransitions, mode: str) -> torch.Tensor:
    if mode == "gaussian":
        return gaussian_kl(policy.mean, policy.std, ref.mean, ref.std)
    if mode == "reference":
        return reference_code_kl(policy.mean, ref.mean)
    raise ValueError(f"kl={mode!r}; valid: 'gaussian', 'reference'")
