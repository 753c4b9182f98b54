"""RL math against first principles: advantages, clipping, KL, masks, MTE averaging."""

import math

import pytest
import torch

from margrpo.rl.advantages import group_advantages
from margrpo.rl.loss import consistency_mask
from margrpo.rl.loss_terms import clipped_surrogate, gaussian_kl, reference_code_kl
from margrpo.sampling.mte import token_uncertainty, top_fraction_mask


def test_group_advantages_hand_example():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    a = group_advantages(r, g, eps=0.0)
    # group 0: mean 2, unbiased std 1 -> [-1, 0, 1]; group 1 ties -> no signal
    assert torch.allclose(a.values, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert a.use.tolist() == [True, True, True, False, False, False]
    assert a.tied_groups == 1 and a.zero_signal_fraction == 0.5


def test_group_advantages_options_and_invalid():
    r = torch.tensor([1.0, 3.0, float("nan"), 0.0, 4.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    valid = torch.tensor([True, True, False, True, True])
    a = group_advantages(r, g, valid, std="none")
    assert torch.allclose(a.values, torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0]))
    assert a.invalid == 1 and not a.use[2]
    b = group_advantages(r, g, valid, std="batch", eps=0.0)
    s = torch.tensor([1.0, 3.0, 0.0, 4.0]).std()
    assert torch.allclose(b.values, torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0]) / s)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(r, g, torch.ones(5, dtype=torch.bool))


def test_clipped_surrogate_hand_values():
    logp = torch.log(torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5]))
    old = torch.zeros(5)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    loss, ratio = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # A>0: min(r, clip r) -> 0.5, 1, 1.2 ; A<0: min(-r, -clip r) -> -1.5, -0.8
    assert torch.allclose(loss, -torch.tensor([0.5, 1.0, 1.2, -1.5, -0.8]), atol=1e-6)
    assert torch.allclose(ratio, torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5]), atol=1e-6)
    # gradient vanishes where the clip is active and the objective would still improve
    lp = logp.clone().requires_grad_(True)
    clipped_surrogate(lp, old, adv, 0.2)[0].sum().backward()
    assert lp.grad[2] == 0 and lp.grad[4] == 0 and lp.grad[0] != 0


def test_gaussian_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.tensor([0.3, -1.0]), torch.tensor([0.0, -0.5])
    sp, sq = torch.tensor([0.5, 1.2]), torch.tensor([0.7, 1.0])
    x = mp + sp * torch.randn(400000, 2, generator=g)
    p, q = torch.distributions.Normal(mp, sp), torch.distributions.Normal(mq, sq)
    mc = (p.log_prob(x) - q.log_prob(x)).mean(0)
    kl = gaussian_kl(mp, sp, mq, sq)
    assert torch.allclose(kl, mc, atol=3e-3)
    assert torch.allclose(kl, torch.distributions.kl_divergence(p, q), atol=1e-6)
    # equal stds: (dmu)^2 / (2 s^2), Flow-GRPO's form
    assert torch.allclose(gaussian_kl(mp, sp, mq, sp), (mp - mq) ** 2 / (2 * sp**2))


def test_reference_kl_is_k3_on_means():
    d = torch.tensor([0.1, -0.2])
    assert torch.allclose(reference_code_kl(torch.zeros(2), d), torch.exp(d) - d - 1)


def test_top_fraction_mask_hand_worked():
    s = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.2], [1.0, 1.0, 0.0, 0.0, 0.5]])
    m = top_fraction_mask(s, 0.4)  # int(5 * 0.4) = 2 per row
    assert m.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert top_fraction_mask(s, 0.05).sum(1).tolist() == [1, 1]  # at least one when fraction > 0
    assert not top_fraction_mask(s, 0.0).any()


def test_token_uncertainty_is_population_std_mean_over_channels():
    x = torch.tensor([[[0.0, 2.0]], [[2.0, 2.0]]])  # K=2, 1 token, 2 channels
    assert torch.allclose(token_uncertainty(x), torch.tensor([0.5]))  # std (1, 0) -> mean 0.5


def test_consistency_mask_hand_worked():
    final = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    step = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    prev = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    committed = torch.tensor([False, False, False, True])
    keep = consistency_mask(step, prev, final, committed, tau=0.0)
    # moved closer -> kept; moved away -> dropped; equal (delta 0, not > tau) -> dropped; committed -> kept
    assert keep.tolist() == [True, False, False, True]


def test_mte_average_of_surrogates_equals_average_of_gradients():
    """The K-trajectory term's gradient is the explicit average of the per-trajectory gradients."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    xs = [torch.tensor([0.1, 0.5]), torch.tensor([-0.4, 0.2]), torch.tensor([1.0, -1.0])]
    adv = torch.tensor(0.7)

    def logp(x, th):
        return torch.distributions.Normal(th, 0.5).log_prob(x)

    old = [logp(x, theta).detach() for x in xs]
    avg = torch.stack([clipped_surrogate(logp(x, theta), o, adv, 0.2)[0] for x, o in zip(xs, old, strict=True)]).mean(0)
    avg.sum().backward()
    g_avg = theta.grad.clone()
    explicit = torch.zeros(2)
    for x in xs:
        th = theta.detach().clone().requires_grad_(True)
        (-adv * logp(x, th)).sum().backward()  # ratio = 1 at the old policy: grad = -A grad logp
        explicit += th.grad / len(xs)
    assert torch.allclose(g_avg, explicit, atol=1e-6)
    assert not math.isclose(float(g_avg.norm()), 0.0)


def test_huge_ratios_stay_finite():
    logp = torch.tensor([5.0, 5.0, 200.0])
    old = torch.zeros(3)
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, ratio = clipped_surrogate(logp, old, adv, clip_eps=0.2)
    # A<0, ratio e^5: min(-e^5, -1.2) = -e^5; A>0: clipped at 1.2; A<0, log-ratio 200 clamped to 20: e^20
    assert torch.allclose(loss, torch.tensor([math.exp(5.0), -1.2, math.exp(20.0)]))
    assert torch.isfinite(ratio).all()
    lp = logp.clone().requires_grad_(True)
    clipped_surrogate(lp, old, adv, 0.2)[0].sum().backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[1] == 0  # the clipped element has no gradient


def _mean_score_z(head, z_draw: torch.Tensor, z_score: torch.Tensor, n: int, chunks: int) -> torch.Tensor:
    """Per-chunk means of d/dz sum_j log p(x_{j+1} | x_j, z_score) over head chains drawn under z_draw."""
    from margrpo.models.heads import gaussian_log_prob

    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(chunks):
        with torch.no_grad():
            xs = [head.init_noise((n, head.token_dim), g, "cpu")]
            for j in range(head.num_steps):
                xs.append(head.sample_step(head.transition(xs[-1], j, z_draw.expand(n, -1)), j, g))
        z = z_score.clone().requires_grad_(True)
        logp = sum(gaussian_log_prob(xs[j + 1], (tr := head.transition(xs[j], j, z.expand(n, -1))).mean, tr.std).sum()
                   for j in range(head.num_steps) if head.is_stochastic(j))
        (grad,) = torch.autograd.grad(logp, z)
        out.append(grad / n)
    return torch.stack(out)


def test_mte_trajectories_drawn_under_the_scored_condition_carry_zero_mean_gradient():
    """DESIGN section 2.8: E[grad log p(tau | z)] = 0 when tau is drawn under the z it is scored under.

    So MTE with ``mte_source: scored`` replaces the main trajectory's reward-carrying term on the selected
    tokens by a zero-mean one; the reference code's ``commit`` source draws under another condition and
    its term is not zero-mean. Measured as a z-score of the Monte Carlo mean against its standard error.
    """
    from margrpo.models.ddpm_head import DdpmHead

    from conftest import randomize

    head = randomize(DdpmHead(4, 8, 16, 1, "5"), std=0.3).eval()
    z_scored = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    z_commit = z_scored + 1.0 * torch.randn(1, 8, generator=torch.Generator().manual_seed(2))

    def zscore(z_draw):
        chunk_means = _mean_score_z(head, z_draw, z_scored, n=500, chunks=40)
        mean, se = chunk_means.mean(0), chunk_means.std(0) / math.sqrt(len(chunk_means))
        return (mean / se).abs().max()

    assert zscore(z_scored) < 4.5  # 8 dims of a standard normal: max |z| > 4.5 has probability ~5e-5
    assert zscore(z_commit) > 10.0


def test_stratified_uniform_puts_one_draw_per_stratum_and_keeps_the_uniform_law():
    from margrpo.rl.loss_terms import stratified_uniform

    u = stratified_uniform(4, 1000, torch.Generator().manual_seed(0), "cpu")
    assert u.shape == (4, 1000)
    k = torch.arange(4)[:, None]
    assert bool(((u >= k / 4) & (u < (k + 1) / 4)).all())  # draw k of every token lies in [k/4, (k+1)/4)
    # pooled over the draws the law is still U[0, 1): mean 1/2, and each quarter holds exactly a quarter
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u[:, 0], u[:, 1])  # offsets are independent per token
    one = stratified_uniform(1, 5, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(one, torch.rand((1, 5), generator=torch.Generator().manual_seed(1)))  # m=1: plain uniform
