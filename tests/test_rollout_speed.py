"""Faster rollouts: the batched MTE chains and the sync-free AR loop give the sequential sampler's rollout."""

from __future__ import annotations

import pytest
import torch

from margrpo.models.conditioning import Condition
from margrpo.models.mar import MAR
from margrpo.sampling.chains import run_chains
from margrpo.sampling.sampler import SamplerConfig, sample

from conftest import randomize, tiny_mar_kwargs


def _model() -> MAR:
    return randomize(MAR(**tiny_mar_kwargs(head="ddpm", num_sampling_steps="6")), std=0.05, seed=1)


def _run(model, **cfg):
    cond = Condition(labels=torch.arange(4) % 10)
    return sample(model, cond, 4, SamplerConfig(num_ar_steps=4, **cfg), torch.Generator().manual_seed(0),
                  torch.Generator().manual_seed(1))


def test_batched_chains_see_each_sequential_chains_noise():
    m = _model()
    z = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))  # the tiny MAR's z width
    seq = run_chains(m.head, z, None, 1.0, 1.0, torch.Generator().manual_seed(5), 3, batched=False)
    bat = run_chains(m.head, z, None, 1.0, 1.0, torch.Generator().manual_seed(5), 3, batched=True)
    assert seq.shape == bat.shape == (3, m.head.num_steps + 1, 10, m.head.token_dim)
    # float32; the head's matmuls may block a 3x larger batch differently, so equality up to rounding
    torch.testing.assert_close(bat, seq, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg", [dict(mte_source="commit"), dict(mte_source="scored"),
                                 dict(mte_source="commit", guidance_scale=3.0, policy_tokens="unknown")],
                         ids=["commit", "scored", "commit-guided-unknown"])
def test_batched_mte_rollout_equals_the_sequential_one(cfg):
    m = _model()
    a = _run(m, mte_k=3, **cfg)
    b = _run(m, mte_k=3, batch_mte_chains=True, **cfg)
    assert torch.equal(a.tokens, b.tokens)  # the main chain does not change at all
    for i, ra in a.steps.items():
        rb = b.steps[i]
        assert torch.equal(ra.x, rb.x) and torch.equal(ra.logp, rb.logp)
        assert torch.equal(ra.mte_tokens, rb.mte_tokens)
        torch.testing.assert_close(rb.mte_x, ra.mte_x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rb.mte_logp, ra.mte_logp, atol=1e-4, rtol=1e-5)


def test_non_finite_chains_still_raise_after_the_loop():
    m = _model()
    with torch.no_grad():
        next(m.head.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(m, mte_k=2)


@pytest.mark.slow
def test_compiled_rollout_is_allclose_to_the_eager_one():
    """`SamplerConfig.compile`: the same rollout up to rounding (inductor fuses and reorders float ops)."""
    m = _model()
    eager = _run(m, mte_k=2)
    try:
        comp = _run(m, mte_k=2, compile=True)
    except Exception as e:  # noqa: BLE001 - no working compiler / inductor backend here: say which, do not fail
        pytest.skip(f"torch.compile does not work on this machine: {type(e).__name__}: {str(e)[:200]}")
    assert "net" in m.head._modules and not hasattr(m.head._modules["net"], "_orig_mod")  # the swap is undone
    torch.testing.assert_close(comp.tokens, eager.tokens, atol=1e-3, rtol=1e-3)
    for i, r in eager.steps.items():
        torch.testing.assert_close(comp.steps[i].logp, r.logp, atol=1e-3, rtol=1e-3)
