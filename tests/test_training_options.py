"""Training options around the objective: gradient checkpointing, bf16 autocast, LoRA adapters and W&B logging.

Each is a switch that must not change what is optimised: the checkpointed gradient equals the stored one, bf16
keeps the RL statistics float32 and close to float32's, LoRA leaves the ratio-is-1 invariant and resume intact.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES

from margrpo.rl.advantages import group_advantages
from margrpo.rl.objective import ObjectiveConfig, ar_step_loss
from margrpo.sampling.sampler import SamplerConfig, sample

ADV = (torch.tensor([0.1, 0.5, 0.9, 0.2, 0.2, 0.8]), torch.tensor([0, 0, 0, 1, 1, 1]))


def _rollout(model, prompts, **cfg):
    cond = model.encode_prompts(list(prompts)).repeat_interleave(3)
    scfg = SamplerConfig(num_ar_steps=4, record_z=False, **cfg)
    return sample(model.policy, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_gives_the_stored_gradient(family, monkeypatch):
    """`Policy.set_gradient_checkpointing(True)` (every family, Harmon's LLM segment included) recomputes the same
    function in backward, so the AR group's gradient is unchanged."""
    import torch.utils.checkpoint as tuc

    fam = FAMILIES[family]
    grads, calls = [], []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for enabled in (False, True):
        calls.clear()
        model = fam.build()
        model.trainable_parameters("ar")
        model.policy.set_gradient_checkpointing(enabled)
        r = _rollout(model, fam.prompts)
        adv = group_advantages(*ADV)
        js = [j for j in range(model.head.num_steps) if model.head.is_stochastic(j)][:2]
        sl = ar_step_loss(model.policy, None, r, 1, js, adv.values, adv.use, ObjectiveConfig(beta=0.0), {}, True)
        sl.loss.backward()
        assert bool(calls) == enabled  # checkpointing is on exactly when asked for
        grads.append({n: p.grad.clone() for n, p in model.policy.parameter_groups()["ar"] if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def _bf16(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


BF16_FAMILIES = [f if f != "nova" else pytest.param(f, marks=pytest.mark.xfail(
    raises=RuntimeError, strict=True, reason="NOVA's forward mixes bf16 and float32 in masked_scatter under autocast "
    "(a known gap: autocast: bf16 is not usable with NOVA yet)")) for f in FAMILIES]


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_autocast_keeps_rl_statistics_float32_and_close_to_float32(family):
    """Under `autocast: bf16` (the trainer's `_autocast` on CPU) the rollout's log-probabilities, the advantages, the
    replayed log-probs, the KL and the loss are float32, and a bf16 rollout replayed under bf16 has ratio 1.

    Against float32 on the same (float32) rollout, measured on the tiny MAR families: z relative error <= 4.7e-3
    (bf16 keeps 8 mantissa bits, ~2e-3 rounding per op, over a few layers), mean |d log-prob| <= 5.4e-4 nats per
    element, KL relative <= 2.6e-3. The tolerances below are 4-10x those. The element-wise *maximum* |d log-prob|
    reaches ~1 nat (a z error of 0.5% times a head step's score gain), which is why the trainer scores bf16 rollouts
    under bf16 too: a rollout must be replayed in the precision it was sampled in, never compared element-wise
    across precisions. Harmon is checked for dtypes and the ratio only: its tiny random LLM amplifies bf16 rounding
    (mean |d log-prob| ~20 nats at the first head step against float32), so no float32 tolerance is claimed for it.
    """
    import copy

    from margrpo.rl.objective import kl_terms
    from margrpo.sampling.replay import score_transitions, step_conditions

    fam = FAMILIES[family]
    model = fam.build()
    model.trainable_parameters("ar")
    policy = model.policy
    reference = copy.deepcopy(policy).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a reference away from the policy, so the KL is not 0
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
    adv = group_advantages(*ADV)
    assert adv.values.dtype == torch.float32
    js = [j for j in range(policy.head.num_steps) if policy.head.is_stochastic(j)][:3]
    ocfg = ObjectiveConfig(beta=0.1, consistency=False, mte_top_fraction=0.3)
    rollouts = {}
    for bf in (False, True):
        with _bf16(bf):
            rollouts[bf] = _rollout(model, fam.prompts, mte_k=3, policy_tokens="unknown")
    rec = rollouts[True].steps[1]
    assert rec.logp.dtype == torch.float32 and rec.mte_logp.dtype == torch.float32
    with _bf16():
        sl = ar_step_loss(policy, reference, rollouts[True], 1, js, adv.values, adv.use, ocfg, {}, first_epoch=True)
    assert sl.loss.dtype == torch.float32 and torch.isfinite(sl.loss)
    for k in ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min"):  # sampled and replayed in bf16
        assert abs(sl.stats[k] - 1) < 1e-5, (k, sl.stats[k])

    r32 = rollouts[False]
    out = {}
    for bf in (False, True):
        with torch.no_grad(), _bf16(bf):
            sc, rsc = step_conditions(policy, r32, 1), step_conditions(reference, r32, 1)
            st = score_transitions(policy.head, r32.steps[1].x, js, sc, r32.temperature)
            kl = kl_terms(st, score_transitions(reference.head, r32.steps[1].x, js, rsc, r32.temperature), "gaussian")
        assert st.logp.dtype == torch.float32 and kl.dtype == torch.float32 and sc.z.dtype == torch.float32
        out[bf] = (sc.z, st.logp, kl)
    if family == "harmon":
        return
    (z32, lp32, kl32), (z16, lp16, kl16) = out[False], out[True]
    assert float((z16 - z32).norm() / z32.norm()) < 2e-2
    assert float((lp16 - lp32).abs().mean()) < 5e-3
    assert abs(float(kl16.mean()) - float(kl32.mean())) < 2e-2 * float(kl32.mean())
