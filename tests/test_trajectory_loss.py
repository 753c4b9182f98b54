"""The trajectory loss, back-propagated one head step at a time, has the value and the gradient of the same loss
written out in one graph (the PPO min, MTE's mean over chains on the uncertain tokens, the reductions, the KL; the
log-probabilities and the Gaussian KL are the ones tested against torch.distributions in test_heads / test_rl_math)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import ESTIMATORS, AlgorithmSection
from margrpo.rl.loss import LOSSES, PolicyNorm, ar_step_loss, kept_policy_tokens, step_z
from margrpo.rl.loss_terms import gaussian_kl
from margrpo.sampling.sampler import sample

from conftest import sampling, tiny_model

CLIP = 0.002  # small, so that after the perturbation below some elements are clipped and some not
DENOMINATOR = 57.0


def _ppo(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rho = torch.exp(logp - old)
    return -torch.minimum(rho * adv, rho.clamp(1 - CLIP, 1 + CLIP) * adv), rho


def one_graph_loss(policy, reference, r, step, js, adv, use, cfg) -> tuple[torch.Tensor, dict]:
    """The loss of AR step `step` in one graph, every term written out."""
    rec = r.steps[step]
    n, c = rec.x.shape[1], rec.x.shape[2]
    img = torch.arange(r.batch_size).repeat_interleave(n // r.batch_size)
    a = adv[img][None, :, None]
    keep = kept_policy_tokens(r, step, use, cfg)[None, :, None].float()
    sc = step_z(policy, r, step, cfg.score_guidance)
    main = policy.head.score_transitions(rec.x, js, sc.z, sc.z_uncond, sc.guidance, r.temperature)
    pg, rho = _ppo(main.logp, rec.logp[js], a)
    idx = rec.mte_tokens  # the uncertain tokens: the mean of their K chains' surrogates replaces the main one
    chains = rec.mte_x.transpose(0, 1)  # [T+1, K, n, C]
    zu = sc.z_uncond[idx] if sc.z_uncond is not None else None
    mte = policy.head.score_transitions(chains, js, sc.z[idx], zu, sc.guidance, r.temperature)
    logp_k = mte.logp.transpose(0, 1)  # [K, J, n, C]
    old_k = rec.mte_logp[:, [rec.mte_head_steps.index(j) for j in js]]
    pg = pg.clone()
    pg[:, idx] = _ppo(logp_k, old_k, a[:, idx][None])[0].mean(0)
    if cfg.head_step_weighting == "std":  # each head step's terms by its mean std over the steps' mean
        std = main.std.detach().mean(dim=(1, 2))
        assert (std / std.mean() - 1).abs().max() > 0.05  # the weights differ: the case is not vacuous
        pg = pg * (std / std.mean())[:, None, None]
    kept_sum = (pg * keep).sum()
    per_token = {"element": keep.sum() * len(js) * c, "token": keep.sum() * len(js), "rollout": DENOMINATOR * c}
    policy_term = kept_sum / per_token[cfg.normalize]
    ref_sc = step_z(reference, r, step, cfg.score_guidance)
    with torch.no_grad():
        ref = reference.head.score_transitions(rec.x, js, ref_sc.z, ref_sc.z_uncond, ref_sc.guidance, r.temperature)
    if cfg.kl == "gaussian":
        kl = gaussian_kl(main.mean, main.std, ref.mean, ref.std)
    else:  # the release's e^d - d - 1 on means
        d = ref.mean - main.mean
        kl = torch.exp(d) - d - 1
    kl_term = kl.sum() / (kl.numel() / (c if cfg.normalize == "token" else 1))
    kept_rho = rho[keep.expand_as(rho).bool()].detach()
    stats = {"loss/policy": float(policy_term.detach()), "loss/kl": float(kl_term.detach()),
             "ratio/mean": float(kept_rho.mean()), "ratio/max": float(kept_rho.max()),
             "clip_fraction": float(((kept_rho - 1).abs() > CLIP).float().mean()),
             "mte/token_fraction": len(idx) / n}
    return policy_term + cfg.beta * kl_term, stats


@pytest.mark.parametrize("case", ["mar-grpo", "head-trains+token-norm", "guided+rollout-norm+release-kl",
                                  "std-weighted-head-steps"])
def test_trajectory_loss_has_the_one_graph_value_and_gradient(case):
    model = tiny_model()
    guidance = 2.0 if case.startswith("guided") else 1.0
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)
    scfg, plan = sampling(ar_steps=4, guidance_scale=guidance, policy_tokens="unknown", mte_k=3, record_z=False)
    r = sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
               record=plan)
    adv = group_advantages(torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))
    cfg = AlgorithmSection(beta=0.1, clip_eps=CLIP, mte_k=3, policy_tokens="consistent", consistency_start=0,
                           normalize={"head-trains+token-norm": "token",
                                      "guided+rollout-norm+release-kl": "rollout"}.get(case, "element"),
                           kl="reference" if case.startswith("guided") else "gaussian",
                           train="both" if case.startswith("head") else "ar",
                           head_step_weighting="std" if case.startswith("std") else "none")
    policy = model.mar
    reference = copy.deepcopy(policy).eval()
    params = [p for _, p in model.trainable_parameters(cfg.train)]
    moved = cfg.train == "ar"  # the head-training case at ratio 1 (clip inactive), as the trainer's first epoch
    if moved:  # move the policy off the rollout's, so ratios differ from 1 and some are clipped
        with torch.no_grad():
            w = policy.z_proj.weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(2)))
    js = [1, 2, 3]  # the head steps the trainer would score (score gain <= 3; 0 and 4 are noise-dominated)
    step = 2
    norm = dataclasses.replace(PolicyNorm.of(r, [step], {step: js}, adv.use, cfg),
                               denominator=DENOMINATOR if cfg.normalize == "rollout" else None)
    sl = ar_step_loss(policy, reference, r, step, js, adv.values, adv.use, cfg, {}, first_epoch=True, norm=norm)
    got = torch.autograd.grad(sl.loss, params, allow_unused=True)
    want_loss, want = one_graph_loss(policy, reference, r, step, js, adv.values, adv.use, cfg)
    expected = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in expected)
    if cfg.train == "both":  # the head's weights get their gradient through the per-head-step terms too
        head_ids = {id(p) for p in policy.head.parameters()}
        assert any(g is not None and g.abs().sum() > 0 for p, g in zip(params, got, strict=True) if id(p) in head_ids)
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None)
        if a is not None:  # float32 sums in another order: measured differences ~1e-9 absolute
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert (0 < want["clip_fraction"] < 1) == moved and want["mte/token_fraction"] > 0
    for k, v in want.items():
        # loss/policy is ~ -mean(A) ~ 0: a sum of O(1) terms that cancel, so its error is absolute
        assert sl.stats[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    assert float(sl.loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-5, abs=1e-6)


def test_every_estimator_choice_has_its_loss_function():
    """`algorithm.estimator`'s choices are the loss table's keys: a new estimator is one entry in each."""
    assert list(LOSSES) == list(ESTIMATORS)
