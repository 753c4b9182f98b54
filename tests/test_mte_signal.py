"""MTE's expected gradient (issue #26, item 4; docs/design.md, "MTE"): what the K chains' term averages to.

The reward depends on a token's committed value only. MTE, as the MAR-GRPO release defines it, replaces the policy
term of the uncertain tokens by the mean score of K fresh head chains that never reach the image; scored under the
z that drew them, E[grad log p(chain | z)] = 0, so its mean over redraws of the chains vanishes like
1/sqrt(M). Bridges (chains of the forward process's reverse that end at the committed value) keep a mean: the
gradient of minus the head's denoising error on that value at the scored steps. These tests measure both through
the real sampler and loss, and check the bridge's law and its expected score against first principles.
"""

from __future__ import annotations

import math

import pytest
import torch

from margrpo.models.ddpm_head import DdpmHead
from margrpo.models.flow_head import FlowHead
from margrpo.models.heads import gaussian_log_prob
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss import ar_step_loss
from margrpo.rl.loss_terms import gaussian_kl
from margrpo.sampling.sampler import sample

from conftest import randomize, sampling, tiny_model


def test_ddpm_bridges_have_the_forward_marginals_and_end_at_the_final_value():
    head = DdpmHead(3, 8, 16, 1, "6").eval()
    x0 = torch.tensor([[0.8, -1.5, 0.0], [2.0, 0.3, -0.7]])
    chains = head.bridge_chains(x0, 20000, generator=torch.Generator().manual_seed(0))  # [K, T+1, N, C]
    assert chains.shape == (20000, 7, 2, 3)
    assert torch.allclose(chains[:, -1], x0.expand(20000, -1, -1), atol=1e-5)  # the last step lands on x0
    s = head.scheduler.schedule
    for j in range(6):  # the state before step j is x0 noised to its index k: sqrt(ab_k) x0 + sqrt(1 - ab_k) eps
        ab = float(s.alphas_cumprod[head.scheduler.index_of_step(j)])
        mean, std = chains[:, j].mean(0), chains[:, j].std(0)
        assert torch.allclose(mean, math.sqrt(ab) * x0, atol=4 * math.sqrt(1 - ab) / math.sqrt(20000) + 1e-3)
        assert torch.allclose(std, torch.full_like(std, math.sqrt(1 - ab)), rtol=0.03)


def test_flow_bridges_end_at_the_final_value_without_noise_and_near_it_with():
    x0 = torch.tensor([[0.5, -0.25]])
    ode = FlowHead(2, 4, 8, 1, num_sampling_steps=8, noise_level=0.0).eval()
    assert torch.allclose(ode.bridge_chains(x0, 3)[:, -1], x0.expand(3, -1, -1), atol=1e-5)
    sde = FlowHead(2, 4, 8, 1, num_sampling_steps=8, noise_level=0.7).eval()
    ends = sde.bridge_chains(x0, 4000, generator=torch.Generator().manual_seed(0))[:, -1]
    assert float((ends.mean(0) - x0).abs().max()) < 0.15  # pulled to x0, within the SDE's O(a^2) terms


def test_a_bridge_steps_expected_score_is_minus_the_gradient_of_its_kl_to_the_head():
    """E over x^{j+1} ~ bridge of grad_z log p_theta(x^{j+1} | x^j, z) = -grad_z KL(bridge || p_theta), exactly
    (E_q log p = -KL(q || p) - H(q), and H(q) does not depend on z): a Monte Carlo mean against autograd."""
    head = randomize(DdpmHead(3, 8, 16, 1, "6"), std=0.3).eval()
    x0 = torch.tensor([[0.8, -1.5, 0.4]])
    z = torch.randn(1, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    j = 2
    xj = head.bridge_chains(x0, 1, generator=torch.Generator().manual_seed(2))[0, j]
    bridge = head.scheduler.bridge_step(xj, j, x0, 1.0)
    n = 200000
    draws = bridge.mean + bridge.std * torch.randn((n, 3), generator=torch.Generator().manual_seed(3))
    tr = head(xj.expand(n, -1), j, z.expand(n, -1))
    (mc,) = torch.autograd.grad(gaussian_log_prob(draws, tr.mean, tr.std).sum() / n, z)
    tr1 = head(xj, j, z)
    (exact,) = torch.autograd.grad(-gaussian_kl(bridge.mean, bridge.std, tr1.mean, tr1.std).sum(), z)
    assert float(exact.norm()) > 1e-3  # the head depends on z: the check is not vacuous
    assert torch.allclose(mc, exact, atol=0.02 * float(exact.abs().max()) + 1e-5)


def _mte_gradients(model, source: str, policy_tokens: str, redraws: int) -> torch.Tensor:
    """The policy-term gradient of one fixed rollout's AR step 2 when MTE covers every token (top fraction 1), for
    `redraws` independent draws of the K = 4 chains (the main rollout is the same every time): [redraws, P]."""
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(4)
    adv, use = torch.tensor([1., -1., 1., -1., -1., 1., -1., 1.]), torch.ones(8, dtype=torch.bool)
    params = [p for _, p in model.trainable_parameters("ar")]
    cfg = AlgorithmSection(beta=0.0, mte_k=4, mte_top_fraction=1.0, mte_source=source, policy_tokens=policy_tokens)
    scfg, plan = sampling(ar_steps=4, policy_tokens=policy_tokens, mte_k=4, mte_source=source, mte_top_fraction=1.0,
                          record_z=False)
    out, tokens = [], None
    for m in range(redraws):
        r = sample(model.mar, cond, 8, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(100 + m),
                   record=plan)
        assert tokens is None or torch.equal(r.tokens, tokens)  # only the chains are redrawn
        tokens = r.tokens
        sl = ar_step_loss(model.mar, None, r, 2, [1, 2, 3], adv, use, cfg, {}, first_epoch=True)
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(sl.loss, params)]))
    return torch.stack(out)


@pytest.mark.parametrize("source,policy_tokens,has_mean", [
    ("scored", "committed", False),  # drawn and scored under the same z: zero mean
    ("commit", "committed", False),  # a committed token's committing step is the scored step: the same
    ("bridge", "committed", True),   # bridges to the committed value keep the token's own contribution
    ("commit", "unknown", True),     # a later step's z scored under this one's: the release's bias
])
def test_the_mte_terms_mean_over_redrawn_chains(source, policy_tokens, has_mean):
    """|mean of M redraws| / mean |single draw|: about 1/sqrt(M) for a zero-mean term (measured 1.2 / sqrt(M) at
    M = 64 for both zero-mean cases), levelling off for a term with a mean (0.47 and 0.52 at M = 64)."""
    m = 32
    g = _mte_gradients(tiny_model(), source, policy_tokens, m)
    ratio = float(g.mean(0).norm() / g.norm(dim=1).mean())
    if has_mean:
        assert ratio > 2.0 / math.sqrt(m)
    else:
        assert ratio < 2.0 / math.sqrt(m)


def test_bridge_mte_scores_the_tokens_commit_mte_chooses_with_chains_that_end_at_their_values():
    model = tiny_model()
    cond = model.encode_prompts(["a red circle", "two blue squares"]).repeat_interleave(3)

    def run(source):
        scfg, plan = sampling(ar_steps=4, policy_tokens="unknown", mte_k=3, mte_source=source, record_z=False)
        return sample(model.mar, cond, 6, scfg, torch.Generator().manual_seed(0), torch.Generator().manual_seed(1),
                      record=plan)

    commit, bridge = run("commit"), run("bridge")
    assert torch.equal(commit.tokens, bridge.tokens) and bridge.mte_source == "bridge"
    for i, rec in bridge.steps.items():
        assert torch.equal(rec.mte_tokens, commit.steps[i].mte_tokens)  # the release's uncertainty ranking
        final = bridge.tokens[rec.diffused][rec.mte_tokens]
        assert torch.allclose(rec.mte_x[:, -1], final.expand_as(rec.mte_x[:, -1]), atol=1e-5)
        assert not torch.allclose(rec.mte_x[:, -1], commit.steps[i].mte_x[:, -1])  # not the release's chains
