"""Faster rollouts: the batched MTE chains see the sequential chains' noise; the sync-free AR loop still checks."""

from __future__ import annotations

import pytest
import torch

from margrpo.models.conditioning import Condition
from margrpo.models.mar import MARPolicy
from margrpo.sampling.sampler import sample

from conftest import randomize, sampling, tiny_mar_kwargs


def _model() -> MARPolicy:
    return randomize(MARPolicy(**tiny_mar_kwargs(head="ddpm", num_sampling_steps="6")), std=0.05, seed=1)


def _run(model, **cfg):
    cond = Condition(labels=torch.arange(4) % 10)
    scfg, plan = sampling(ar_steps=4, **cfg)
    return sample(model, cond, 4, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), record=plan)


def test_batched_chains_see_each_sequential_chains_noise():
    m = _model()
    z = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))  # the tiny MAR's z width
    g = torch.Generator().manual_seed(5)  # three chains one after the other, from one stream
    seq = torch.stack([m.head.sample_chain(z, None, 1.0, 1.0, g, True)[1]["x"] for _ in range(3)])
    bat = m.head.sample_chains(z, None, 1.0, 1.0, torch.Generator().manual_seed(5), 3)
    assert seq.shape == bat.shape == (3, m.head.num_steps + 1, 10, m.head.token_dim)
    # float32; the head's matmuls may block a 3x larger batch differently, so equality up to rounding
    torch.testing.assert_close(bat, seq, atol=1e-5, rtol=1e-5)


def test_non_finite_chains_still_raise_after_the_loop():
    m = _model()
    with torch.no_grad():
        next(m.head.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        _run(m, mte_k=2)

