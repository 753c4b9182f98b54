"""The loss of one scored AR step: the policy term of the configured estimator + beta * KL to the reference.

Per scored element (token x channel x head step j), with rho = exp(logp_theta - logp_old): L_pg = -min(rho A,
clip(rho, 1-eps, 1+eps) A); L = reduce(L_pg over kept policy elements) + beta * reduce(KL(pi_theta || pi_ref)).

The estimator of the policy term is one entry of `LOSSES` (one signature: `(ScoredStep, AlgorithmSection) ->
StepLoss`); a new estimator is one function there plus its name in `rl/config.py`'s `ESTIMATORS`:

* `trajectory` (GRPO / DDPO, MAR-GRPO): the recorded head transitions, scored one head step at a time (below).
  MTE: on the rollout's most uncertain tokens the policy term is the mean over their K extra chains'
  surrogates (the rollout chose the tokens and recorded the chains, `sampling/mte.py`).
* `matching` (advantage-weighted matching, Xue et al. 2025) and `nft` (DiffusionNFT, Zheng et al. 2025): the
  head's training loss on each token's final value (`rl/loss_terms.py`), so [J, N, C] becomes [draws, N, 1].

Shared by all three: the kept tokens (a token's image must carry signal; with `policy_tokens: consistent`, for AR
steps i > i0 a still-unknown token must have moved toward its final value since step i-1; committed tokens always
stay), the reduction, and the KL (never filtered, on the main trajectory). `reduce` is a mean over kept elements per
AR step (`normalize="element"`), a sum over channels and a mean over kept (token, step) pairs (`"token"`, Harmon's),
or every kept sum over the kept (token, head step) pairs of the whole rollout (`"rollout"`). `PolicyNorm` computes
the kept tokens, that denominator and each rank's weight once per rollout.

Old log-probabilities are the rollout's own, recorded under the density the loss scores (guided, or the conditional
branch alone: `score_guidance="cond_only"`), so rho = 1 before the first update checks this replay against
sampling. The forward-process estimators' old losses come from the first PPO epoch; the frozen reference's
transitions are cached across epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from margrpo.models.base import Policy
from margrpo.models.heads import DiffusionHead, ScoredTransitions
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss_terms import MAX_LOG_RATIO, clipped_surrogate, kl_terms, matching_terms, nft_terms, ratio_stats
from margrpo.sampling.mte import token_uncertainty
from margrpo.sampling.rollout import ARStepRecord, Rollout
from margrpo.sampling.sampler import guided_z


@dataclass
class StepLoss:
    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class StepZ:  # recomputed z of one AR step, restricted to its diffused tokens ([N, D])
    z: torch.Tensor
    z_uncond: torch.Tensor | None
    guidance: float
    z_full: torch.Tensor  # [B, L, D]


def step_z(policy: Policy, rollout: Rollout, ar_step: int, score_guidance: str = "rollout") -> StepZ:
    """z for AR step `ar_step` from its recorded canvas and known set, in eval mode as at sampling, with the sampler's
    own `guided_z` and batch layout, so that before any update the recomputed log-probabilities equal the
    recorded ones. `score_guidance="cond_only"` leaves the unconditional branch out (the MAR-GRPO release scores the
    conditional branch alone)."""
    if ar_step not in rollout.steps:
        raise KeyError(f"AR step {ar_step} was not recorded; recorded steps: {sorted(rollout.steps)}")
    rec = rollout.steps[ar_step]
    guided = rollout.guidance_scale != 1.0 and score_guidance == "rollout"
    was_training = policy.training
    policy.eval()  # dropout off as at sampling, whatever mode the trainer keeps the model in; gradients still flow
    try:
        z_c, z_u = guided_z(policy, rec.canvas, rec.mask, rollout.cond, guided)
    finally:
        policy.train(was_training)
    sel = rec.diffused
    return StepZ(z=z_c[sel], z_uncond=z_u[sel] if z_u is not None else None,
                 guidance=rec.guidance if guided else 1.0, z_full=z_c)


def replay_transitions(head: DiffusionHead, x: torch.Tensor, js: Sequence[int], cond: StepZ,
                       temperature: float, tokens: torch.Tensor | None = None) -> ScoredTransitions:
    """`head.score_transitions` under a step's recomputed z (of `tokens`, an index tensor into its N diffused
    tokens, when given: x is then [T+1, ..., n, C])."""
    z, zu = cond.z, cond.z_uncond
    if tokens is not None:
        z = z[tokens]
        zu = zu[tokens] if zu is not None else None
    return head.score_transitions(x, js, z, zu, cond.guidance, temperature)


# ------------------------------------------------------------------------------------------- one scored AR step
def consistency_mask(step_values: torch.Tensor, prev_values: torch.Tensor, final: torch.Tensor,
                     committed: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """MAR-GRPO's consistency-aware selection: keep committed tokens, and unknown ones whose step output moved toward
    the final token (cosine over channels gained more than `tau` since the previous step). Inputs are aligned over
    the same tokens: step_values / prev_values / final [..., C], committed [...] bool."""
    def cosine(values: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(values.float(), final.float(), dim=-1, eps=1e-8)

    return committed | (cosine(step_values) - cosine(prev_values) > tau)


def kept_policy_tokens(rollout: Rollout, ar_step: int, use: torch.Tensor, cfg: AlgorithmSection,
                       stats: dict[str, float] | None = None) -> torch.Tensor:
    """[N] bool over AR step `ar_step`'s diffused tokens: those that enter the policy term (module docstring)."""
    rec = rollout.steps[ar_step]
    b = rollout.batch_size
    img = torch.arange(b, device=rec.x.device).repeat_interleave(int(rec.diffused.sum()) // b)
    keep = use.to(rec.x.device)[img].clone()
    if cfg.policy_tokens == "consistent" and ar_step > cfg.consistency_start and (ar_step - 1) in rollout.steps:
        prev_vals = rollout.steps[ar_step - 1].final_values()[rec.diffused]
        final = rollout.tokens[rec.diffused]
        cons = consistency_mask(rec.x[-1], prev_vals, final, rec.committed_in_diffused(), cfg.consistency_tau)
        keep &= cons
        if stats is not None:
            stats["mask/consistency_kept"] = float(cons.float().mean())
    if stats is not None:
        stats["mask/policy_tokens"] = float(keep.float().mean())
    return keep


@dataclass
class PolicyNorm:
    """What each scored AR step's policy term is weighed by, computed once per rollout (`of`): the tokens it keeps
    (and the statistics of that choice), this rank's weight, and with `normalize: rollout` the denominator.

    A rank's policy term is a mean over its k_r kept elements; DDP / FSDP2 average gradients over W ranks; the
    one-process term is sum / K, K = sum_r k_r. So rank r's mean is weighed W k_r / K (k counts kept tokens), and
    the averaged gradient is that of one mean over the global batch; with normalize=rollout (the global pair count
    divides) the weight is W. The KL, a mean over all tokens of equal shards, needs no weight.
    """

    keep: dict[int, torch.Tensor]  # [N] bool per scored AR step
    mask_stats: dict[int, dict[str, float]]
    weights: dict[int, float]
    denominator: float | None = None

    @classmethod
    def of(cls, rollout: Rollout, ar_steps: list[int], head_steps: dict[int, list[int]], use: torch.Tensor,
           cfg: AlgorithmSection, world: int = 1,
           all_reduce_sum: Callable[[list[float]], list[float]] | None = None) -> PolicyNorm:
        """`use` [B]: the images with signal; `all_reduce_sum` sums a few scalars over the ranks (one process:
        none)."""
        keep, mask_stats = {}, {}
        for i in ar_steps:
            mask_stats[i] = {}
            keep[i] = kept_policy_tokens(rollout, i, use, cfg, mask_stats[i])
        local = [float(keep[i].sum()) for i in ar_steps]
        reduce = all_reduce_sum or (lambda values: [float(v) for v in values])
        denominator = None
        if cfg.normalize == "rollout":  # the trainer scales each AR step's loss by 1 / len(ar_steps)
            draws = cfg.noise_draws if cfg.estimator != "trajectory" else None
            pairs = reduce([sum(k * (draws or len(head_steps[i])) for k, i in zip(local, ar_steps, strict=True))])[0]
            denominator = max(pairs, 1.0) / (1 if cfg.update == "ar_step" else len(ar_steps))
        if world == 1:
            weights = dict.fromkeys(ar_steps, 1.0)
        elif cfg.normalize == "rollout":
            weights = dict.fromkeys(ar_steps, float(world))
        else:
            total = reduce(local)
            weights = {i: world * k / t if t > 0 else 1.0 for i, k, t in zip(ar_steps, local, total, strict=True)}
        return cls(keep, mask_stats, weights, denominator)


@dataclass
class ScoredStep:
    """What every estimator of `LOSSES` gets for one scored AR step."""

    policy: Policy
    reference: Policy | None
    rollout: Rollout
    rec: ARStepRecord
    js: list[int]  # the scored head steps
    adv: torch.Tensor  # [1, N, 1] each diffused token's advantage
    keep: torch.Tensor  # [N] bool: the tokens in the policy term
    step_z: StepZ
    cache: dict  # across PPO epochs: the forward-process estimators' old terms, the reference's transitions
    first_epoch: bool
    generator: torch.Generator | None  # the forward-process estimators' draws (the same in every epoch)
    policy_denominator: float | None  # normalize="rollout": the rollout's kept (token, head step) pairs
    policy_weight: float  # on the policy term (not the KL): this rank's share of the global batch
    stats: dict[str, float]

    def policy_count(self, terms: int, channels: int, normalize: str) -> tuple[float, float]:
        """(what the kept sum of the policy term is divided by, the number of kept elements it logs) for `terms`
        head steps or noise draws of `channels` values per token."""
        kept = float(self.keep.float().sum())
        if normalize == "rollout":
            if self.policy_denominator is None:
                raise ValueError("normalize='rollout' divides by the rollout's kept (token, head step) pairs: pass "
                                 "a PolicyNorm of the whole rollout (PolicyNorm.of), which holds that denominator")
            return float(self.policy_denominator) * channels, kept * terms
        count = kept * terms * (channels if normalize == "element" else 1)
        return count, count

    def reference_transitions(self, score_guidance: str) -> ScoredTransitions:
        """The frozen reference's transitions at the scored head steps, computed once per rollout (cached)."""
        key = ("reference", self.rec.ar_step, tuple(self.js))
        if key not in self.cache:
            with torch.no_grad():
                sc = step_z(self.reference, self.rollout, self.rec.ar_step, score_guidance)
                self.cache[key] = replay_transitions(self.reference.head, self.rec.x, self.js, sc,
                                                     self.rollout.temperature)
        return self.cache[key]


def ar_step_loss(policy: Policy, reference: Policy | None, rollout: Rollout, ar_step: int,
                 head_steps: list[int], advantages: torch.Tensor, use: torch.Tensor, cfg: AlgorithmSection,
                 old_cache: dict, first_epoch: bool, generator: torch.Generator | None = None,
                 norm: PolicyNorm | None = None) -> StepLoss:
    """Loss of AR step `ar_step` of `rollout` at head steps `head_steps` (see the module docstring).

    `advantages` [B] and `use` [B] (valid and informative samples) are per image; `ScoredStep` says what the other
    arguments are. `norm`: the rollout's `PolicyNorm` (a trainer computes it once for all its scored steps; without
    one, this AR step's own in one process: normalize=rollout needs the rollout's). Its weight multiplies the policy
    term (not the KL); `stats` keep the unweighted value.
    """
    if cfg.estimator not in LOSSES:
        raise ValueError(f"estimator={cfg.estimator!r}; valid: {', '.join(map(repr, LOSSES))}")
    for p in (policy, reference):
        if p is not None and p.head.num_steps != rollout.head_steps:
            raise ValueError(f"the head samples {p.head.num_steps} steps, the rollout recorded {rollout.head_steps}; "
                             f"call head.set_sampling_steps({rollout.head_steps})")
    rec = rollout.steps[ar_step]
    b = rollout.batch_size
    img = torch.arange(b, device=rec.x.device).repeat_interleave(int(rec.diffused.sum()) // b)
    if norm is None and cfg.normalize != "rollout":
        norm = PolicyNorm.of(rollout, [ar_step], {ar_step: head_steps}, use, cfg)
    keep = norm.keep[ar_step] if norm else kept_policy_tokens(rollout, ar_step, use, cfg)
    sc = step_z(policy, rollout, ar_step, cfg.score_guidance)
    scored = ScoredStep(policy=policy, reference=reference, rollout=rollout, rec=rec, js=list(head_steps),
                        adv=advantages.to(rec.x.device).float()[img][None, :, None], keep=keep,
                        step_z=sc, cache=old_cache, first_epoch=first_epoch, generator=generator,
                        policy_denominator=norm.denominator if norm else None,
                        policy_weight=norm.weights[ar_step] if norm else 1.0,
                        stats=dict(norm.mask_stats[ar_step]) if norm else {})
    return LOSSES[cfg.estimator](scored, cfg)


# ------------------------------------------------------------------------------------------- the estimators
def trajectory_loss(s: ScoredStep, cfg: AlgorithmSection) -> StepLoss:
    """The trajectory estimator's loss of one AR step, back-propagated one scored head step at a time.

    Why: in one graph the head activations of all (1 + K) x J transitions (main trajectory and K MTE chains, J head
    steps) would be alive at the backward. The loss is a sum of (trajectory, head step) terms with weights known in
    advance (element-level ratios, kept-token masks, the reduction's counts), so each head step's terms -- the main
    trajectory's with its KL, then the K chains' on the uncertain tokens (one head call) -- are differentiated alone
    (`torch.autograd.grad`) into the step's z (and the head's trainable weights) and their graph freed. The loss
    returned has the summed value and, through `(z * dL/dz).sum()` (+ the head weights'; exactly 0 in value), the
    summed gradient, for the caller's backward through the transformer.
    """
    rollout, rec, js, keep, sc, stats = s.rollout, s.rec, s.js, s.keep, s.step_z, s.stats
    dev = rec.x.device
    temperature = rollout.temperature
    n_tok, c = rec.x.shape[1], rec.x.shape[2]
    n_j = len(js)
    keep_f = keep.float()
    count, n_el = s.policy_count(n_j, c, cfg.normalize)
    w = keep_f / count if count > 0 else torch.zeros_like(keep_f)  # per-token weight of a (head step, channel)
    mte = None
    if cfg.mte_k and cfg.mte_top_fraction > 0 and rec.mte_x is not None:
        idx = rec.mte_tokens
        stats["mte/token_fraction"] = len(idx) / max(1, n_tok)
        stats["mte/uncertainty_mean"] = float(token_uncertainty(rec.mte_x[:, -1]).mean()) if len(idx) else 0.0
        if len(idx):
            missing = sorted(set(js) - set(rec.mte_head_steps))
            if missing:
                raise ValueError(f"AR step {rec.ar_step}: the rollout recorded MTE log-probabilities at head steps "
                                 f"{rec.mte_head_steps}, not at {missing} (the RecordPlan's head_steps)")
            mte = (idx, rec.mte_logp[:, [rec.mte_head_steps.index(j) for j in js]])
    w_main = w.clone() if mte is not None else w  # the uncertain tokens' term: their chains'
    if mte is not None:
        w_main[mte[0]] = 0.0
    # old log-probabilities: the rollout's own, under the density the loss scores
    old = rec.logp_cond if cfg.score_guidance == "cond_only" and rollout.guidance_scale != 1.0 else rec.logp
    if old is None:
        raise ValueError("score_guidance='cond_only' scores the conditional branch, but the rollout recorded no "
                         "log-probabilities for it (a RecordPlan with score_guidance='cond_only')")
    old = old[js]
    step_weights = [1.0] * n_j
    if cfg.head_step_weighting == "std":  # each head step's policy term by its mean std over the steps' mean
        with torch.no_grad():
            stds = torch.stack([replay_transitions(s.policy.head, rec.x, [j], sc, temperature).std.mean() for j in js])
        step_weights = list(stds / stds.mean())
    use_kl = s.reference is not None and cfg.beta > 0
    if use_kl:
        ref = s.reference_transitions(cfg.score_guidance)
        kl_count = n_tok * n_j * (1 if cfg.normalize == "token" else c)

    z = sc.z.detach().requires_grad_(True)
    zu = sc.z_uncond.detach().requires_grad_(True) if sc.z_uncond is not None else None
    leaf_sc = StepZ(z=z, z_uncond=zu, guidance=sc.guidance, z_full=sc.z_full)
    head_params = [p for p in s.policy.head.parameters() if p.requires_grad]
    leaves = [z, *([zu] if zu is not None else []), *head_params]
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    zero = torch.zeros((), device=dev)
    policy_value, kl_value = zero, zero
    kept = keep[None, :, None]
    r_sum, r_n, r_max, r_min, r_clip = zero, 0, None, None, zero
    mte_max, mte_min = None, None
    weight = s.policy_weight

    def accumulate(term: torch.Tensor) -> None:
        for k, g in enumerate(torch.autograd.grad(term, leaves, allow_unused=True)):
            if g is not None:
                grads[k] = g if grads[k] is None else grads[k] + g

    for c0, j in enumerate(js):
        jc = [j]
        main = replay_transitions(s.policy.head, rec.x, jc, leaf_sc, temperature)
        pg, ratio = clipped_surrogate(main.logp, old[c0:c0 + 1], s.adv, cfg.clip_eps)
        pol = (pg * w_main[None, :, None]).sum() * step_weights[c0]
        term = pol if weight == 1.0 else weight * pol
        if use_kl:
            kl = kl_terms(main, ScoredTransitions(js=jc, mean=ref.mean[c0:c0 + 1], std=ref.std[c0:c0 + 1],
                                                  logp=ref.logp[c0:c0 + 1]), cfg.kl).sum() / kl_count
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
            # the K chains of the uncertain tokens together: their z is computed once per token
            idx, old_k = mte
            k_chains = rec.mte_x.shape[0]
            new = replay_transitions(s.policy.head, rec.mte_x.transpose(0, 1), jc, leaf_sc, temperature,
                                     tokens=idx).logp.transpose(0, 1)
            old_c = old_k[:, c0:c0 + 1]
            pg_k = clipped_surrogate(new, old_c, s.adv[:, idx][None], cfg.clip_eps)[0]
            pol = (pg_k * w[idx][None, None, :, None]).sum() / k_chains * step_weights[c0]
            accumulate(pol if weight == 1.0 else weight * pol)
            policy_value = policy_value + pol.detach()
            with torch.no_grad():
                rk = torch.exp((new - old_c).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
                mte_max = rk.max() if mte_max is None else torch.maximum(mte_max, rk.max())
                mte_min = rk.min() if mte_min is None else torch.minimum(mte_min, rk.min())
            del new, pg_k, pol
    # the loss: the head steps' value, and the gradient they left on z (and the head) for the caller's backward
    loss = (policy_value if weight == 1.0 else weight * policy_value) + cfg.beta * kl_value
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


def _forward_process_loss(s: ScoredStep, cfg: AlgorithmSection, pg: torch.Tensor,
                          ratio: torch.Tensor | None) -> StepLoss:
    """A forward-process estimator's per-draw terms `pg` [M, N, 1], reduced over the kept tokens, + beta * KL."""
    rec, stats = s.rec, s.stats
    count, n_el = s.policy_count(pg.shape[0], 1, cfg.normalize)
    if count == 0:
        policy_loss = pg.sum() * 0.0
    else:
        policy_loss = (pg * s.keep.float()[None, :, None]).sum() / count
    kl_loss = torch.zeros((), device=rec.x.device)
    if s.reference is not None and cfg.beta > 0:
        main = replay_transitions(s.policy.head, rec.x, s.js, s.step_z, s.rollout.temperature)
        kl = kl_terms(main, s.reference_transitions(cfg.score_guidance), cfg.kl)
        kl_loss = kl.sum() / (kl.shape[0] * kl.shape[1] * (1 if cfg.normalize == "token" else kl.shape[2]))
    loss = (policy_loss if s.policy_weight == 1.0 else s.policy_weight * policy_loss) + cfg.beta * kl_loss
    stats.update({"loss/policy": float(policy_loss.detach()), "loss/kl": float(kl_loss.detach()), "elements": n_el})
    if ratio is not None:
        stats.update(ratio_stats(ratio, s.keep, cfg.clip_eps))
    return StepLoss(loss=loss, stats=stats)


def matching_loss(s: ScoredStep, cfg: AlgorithmSection) -> StepLoss:
    """Advantage-weighted matching: the PPO surrogate on minus the head's pretraining loss (`matching_terms`)."""
    pg, ratio = matching_terms(s.policy.head, s.rollout.tokens[s.rec.diffused], s.step_z.z, s.adv, cfg,
                               s.cache, ("matching", s.rec.ar_step), s.first_epoch, s.generator)
    return _forward_process_loss(s, cfg, pg, ratio)


def nft_loss(s: ScoredStep, cfg: AlgorithmSection) -> StepLoss:
    """DiffusionNFT's negative-aware loss on each token's final value (`nft_terms`)."""
    pg, nft_stats = nft_terms(s.policy.head, s.rollout.tokens[s.rec.diffused], s.step_z.z, s.adv, cfg,
                              s.cache, ("nft", s.rec.ar_step), s.first_epoch, s.generator)
    s.stats.update(nft_stats)
    return _forward_process_loss(s, cfg, pg, None)


# the estimators of the policy term, by `algorithm.estimator` (its choices, `rl.config.ESTIMATORS`, name these)
LOSSES: dict[str, Callable[[ScoredStep, AlgorithmSection], StepLoss]] = {
    "trajectory": trajectory_loss,
    "matching": matching_loss,
    "nft": nft_loss,
}
