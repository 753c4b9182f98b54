"""Diffusion heads against first principles: torch.distributions and upstream's published formulas."""

import math

import numpy as np
import pytest
import torch

from margrpo.models.ddpm_head import DdpmHead
from margrpo.models.flow_head import FlowHead
from margrpo.models.heads import gaussian_log_prob
from margrpo.models.schedulers import DdpmSchedule, flow_sigmas

from conftest import randomize


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs error over max abs value, the tolerance measure the issue specifies."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(50, 7, generator=g), torch.rand(50, 7, generator=g) + 0.01
    x = mean + std * torch.randn(50, 7, generator=g)
    ref = torch.distributions.Normal(mean, std).log_prob(x)
    assert torch.allclose(gaussian_log_prob(x, mean, std), ref, atol=1e-5, rtol=1e-6)


def test_log_prob_is_float32_under_bf16_autocast():
    x = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = gaussian_log_prob(x.bfloat16(), torch.zeros(4, 3).bfloat16(), torch.ones(4, 3))
    assert lp.dtype == torch.float32


def _ddpm_reference(head, x, k, out_c, out_u, w, clip, clip_range=1.0):
    """improved-DDPM p_mean_variance (LEARNED_RANGE, EPSILON) in float64 numpy, CFG on eps only."""
    s = DdpmSchedule.create(str(head.num_steps), "cosine", 1000)
    c = head.token_dim
    eps_c, v = out_c[:, :c].double().numpy(), out_c[:, c:].double().numpy()
    eps = eps_c if out_u is None else out_u[:, :c].double().numpy() + w * (eps_c - out_u[:, :c].double().numpy())
    xn = x.double().numpy()
    x0 = s.sqrt_recip_alphas_cumprod[k] * xn - s.sqrt_recipm1_alphas_cumprod[k] * eps
    if clip:
        x0 = np.clip(x0, -clip_range, clip_range)
    mean = s.posterior_mean_coef1[k] * x0 + s.posterior_mean_coef2[k] * xn
    frac = (v + 1) / 2
    log_var = frac * np.log(s.betas[k]) + (1 - frac) * s.posterior_log_variance_clipped[k]
    return torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * log_var))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("clip,clip_range", [(False, 1.0), (True, 1.0), (True, 2.5)])
def test_ddpm_transition_matches_upstream_formula(guidance, clip, clip_range):
    head = randomize(DdpmHead(6, 16, 32, 2, "10", clip_denoised=clip, clip_range=clip_range))
    g = torch.Generator().manual_seed(1)
    x, z, zu = torch.randn(20, 6, generator=g), torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g)
    for j in [0, 4, 8]:
        k = head.num_steps - 1 - j
        t = torch.full((20,), head.net_timestep(j))
        out_c = head.net(x, t, z)
        out_u = head.net(x, t, zu) if guidance != 1.0 else None
        tr = head.transition(x, j, z, zu if guidance != 1.0 else None, guidance)
        mean, std = _ddpm_reference(head, x, k, out_c, out_u, guidance, clip, clip_range)
        assert rel_err(tr.mean, mean) < 1e-5
        assert rel_err(tr.std, std) < 1e-5
    # the net sees the original (not respaced) timestep, as MAR's _WrappedModel maps it
    assert head.net_timestep(0) == 999 and head.net_timestep(head.num_steps - 1) == 0


def test_ddpm_last_step_is_deterministic():
    head = randomize(DdpmHead(4, 8, 16, 1, "5"))
    assert [head.is_stochastic(j) for j in range(5)] == [True] * 4 + [False]
    x, z = torch.randn(3, 4), torch.randn(3, 8)
    tr = head.transition(x, 4, z)
    assert torch.equal(head.sample_step(tr, 4, torch.Generator().manual_seed(0)), tr.mean)


def test_sample_step_draws_from_the_transition():
    head = randomize(DdpmHead(4, 8, 16, 1, "5"))
    x, z = torch.randn(1, 4).expand(20000, 4), torch.randn(1, 8).expand(20000, 8)
    tr = head.transition(x, 1, z)
    xs = head.sample_step(tr, 1, torch.Generator().manual_seed(0))
    assert torch.allclose(xs.mean(0), tr.mean[0], atol=4 * tr.std[0].max().item() / math.sqrt(20000))
    assert torch.allclose(xs.std(0), tr.std[0], rtol=0.03)


def test_ddpm_loss_matches_improved_ddpm_formula():
    """MSE on eps + VLB with frozen mean (KL for t>0, discretised decoder NLL for t=0), per sample."""
    head = randomize(DdpmHead(6, 16, 32, 2, "10"))
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 6, generator=g) * 2 - 1
    z, noise = torch.randn(8, 16, generator=g), torch.randn(8, 6, generator=g)
    t = torch.tensor([0, 1, 5, 100, 500, 900, 998, 999])
    loss = head.loss(x0, z, t=t, noise=noise)
    s = DdpmSchedule.create(1000, "cosine", 1000)
    tn = t.numpy()
    xt = s.sqrt_alphas_cumprod[tn][:, None] * x0.double().numpy() + \
        s.sqrt_one_minus_alphas_cumprod[tn][:, None] * noise.double().numpy()
    out = head.net(torch.from_numpy(xt).float(), t, z).double().numpy()
    eps, v = out[:, :6], out[:, 6:]
    mse = ((noise.double().numpy() - eps) ** 2).mean(1)
    tm = s.posterior_mean_coef1[tn][:, None] * x0.double().numpy() + s.posterior_mean_coef2[tn][:, None] * xt
    tlv = s.posterior_log_variance_clipped[tn][:, None]
    px0 = s.sqrt_recip_alphas_cumprod[tn][:, None] * xt - s.sqrt_recipm1_alphas_cumprod[tn][:, None] * eps
    pm = s.posterior_mean_coef1[tn][:, None] * px0 + s.posterior_mean_coef2[tn][:, None] * xt
    frac = (v + 1) / 2
    plv = frac * np.log(s.betas[tn])[:, None] + (1 - frac) * tlv
    kl = 0.5 * (-1 + plv - tlv + np.exp(tlv - plv) + (tm - pm) ** 2 * np.exp(-plv))
    kl = kl.mean(1) / math.log(2)
    # t = 0: discretised Gaussian decoder NLL (8-bit bins on [-1, 1]) with the tanh CDF approximation
    def cdf(u):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))

    xn = x0.double().numpy()
    inv = np.exp(-0.5 * plv)
    plus, minus = cdf(inv * (xn - pm + 1 / 255)), cdf(inv * (xn - pm - 1 / 255))
    logp = np.where(xn < -0.999, np.log(np.maximum(plus, 1e-12)),
                    np.where(xn > 0.999, np.log(np.maximum(1 - minus, 1e-12)),
                             np.log(np.maximum(plus - minus, 1e-12))))
    nll = -logp.mean(1) / math.log(2)
    expected = mse + np.where(tn == 0, nll, kl)
    assert rel_err(loss, torch.from_numpy(expected)) < 1e-5


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_flow_transition_matches_flow_grpo_sde(guidance):
    head = randomize(FlowHead(5, 12, 24, 2, num_sampling_steps=6, noise_level=0.7))
    g = torch.Generator().manual_seed(3)
    x, z, zu = torch.randn(9, 5, generator=g), torch.randn(9, 12, generator=g), torch.randn(9, 12, generator=g)
    sig = flow_sigmas(6)
    for j in range(6):
        sigma, sigma_next = sig[j], sig[j + 1]
        t = torch.full((9,), sigma * 1000.0)
        v = head.net(x, t, z).double()
        if guidance != 1.0:
            vu = head.net(x, t, zu).double()
            v = vu + guidance * (v - vu)
        dt = sigma_next - sigma
        std_dev_t = 0.7 * math.sqrt(sigma / (1 - (sig[1] if sigma == 1 else sigma)))
        mean = x.double() * (1 + std_dev_t**2 / (2 * sigma) * dt) \
            + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        tr = head.transition(x, j, z, zu if guidance != 1.0 else None, guidance)
        assert rel_err(tr.mean, mean) < 1e-5
        assert tr.std[0, 0].item() == pytest.approx(std_dev_t * math.sqrt(-dt), rel=1e-6)


def test_flow_ode_when_noise_level_zero():
    head = randomize(FlowHead(5, 12, 24, 1, num_sampling_steps=4, noise_level=0.0))
    x, z = torch.randn(3, 5), torch.randn(3, 12)
    tr = head.transition(x, 1, z)
    sig = flow_sigmas(4)
    v = head.net(x, torch.full((3,), sig[1] * 1000.0), z)
    assert torch.allclose(tr.mean, x + v * (sig[2] - sig[1]), atol=1e-6)
    assert not head.is_stochastic(1)


def test_flow_loss_is_velocity_mse():
    head = randomize(FlowHead(5, 12, 24, 1))
    x0, z, noise = torch.randn(4, 5), torch.randn(4, 12), torch.randn(4, 5)
    sig = torch.tensor([0.1, 0.4, 0.7, 0.95])
    loss = head.loss(x0, z, t=sig, noise=noise)
    xs = (1 - sig[:, None]) * x0 + sig[:, None] * noise
    v = head.net(xs, sig * 1000, z)
    assert torch.allclose(loss, ((v - (noise - x0)) ** 2).mean(1), atol=1e-6)


def test_loss_noise_levels_are_the_inverse_cdf_of_the_default_training_draws():
    """Stratified matching draws map u in [0, 1) through these; each must reproduce `loss`'s own law."""
    ddpm = DdpmHead(5, 12, 24, 1, num_sampling_steps="10")
    n = ddpm.train_schedule.num_steps
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # one u in each of n strata -> every timestep once
    assert torch.equal(ddpm.loss_noise_levels(u), torch.arange(n))
    assert int(ddpm.loss_noise_levels(torch.tensor([0.0, 1 - 1e-9])).max()) == n - 1  # never T itself

    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 1e-9])
    assert torch.allclose(FlowHead(5, 12, 24, 1, train_sigma_sampling="uniform").loss_noise_levels(u),
                          u.clamp(1e-6, 1 - 1e-6))
    # logit-normal: sigma = sigmoid(N(0, 1)); its u-quantile is sigmoid(Phi^-1(u))
    got = FlowHead(5, 12, 24, 1).loss_noise_levels(torch.tensor([0.5, 0.8413447460685429, 0.15865525393145707]))
    assert torch.allclose(got, torch.sigmoid(torch.tensor([0.0, 1.0, -1.0])), atol=1e-5)
    ends = FlowHead(5, 12, 24, 1).loss_noise_levels(torch.tensor([0.0, 1.0]))
    assert bool(torch.isfinite(ends).all()) and 0 < float(ends[0]) < float(ends[1]) < 1


class _FixedOutput(torch.nn.Module):
    """A head network that returns a given output whatever its input (to differentiate the step by hand)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t, z):
        return self.out.expand(x.shape[0], -1)


def _mean_slope_over_std(head, j: int, out: torch.Tensor, channel_slice: slice, var_value: float | None) -> float:
    """|d mean / d output| / std of step j by a central difference on the network output (the mean is linear in
    it where nothing clamps, so a large step is exact and keeps float32 round-off out of the slope)."""
    x = torch.randn(1, head.token_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    z = torch.zeros(1, 4)
    h = 0.5
    means = []
    for sign in (1.0, -1.0):
        o = out.clone()
        o[:, channel_slice] += sign * h
        head.net = _FixedOutput(o)
        means.append(head.transition(x, j, z).mean.double())
    tr = head.transition(x, j, z)
    slope = float(((means[0] - means[1]) / (2 * h)).abs().mean())
    std = float(tr.std.double().mean()) if var_value is None else var_value
    return slope / std


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_score_gain_is_the_mean_slope_over_the_posterior_std(steps):
    head = DdpmHead(3, 4, 8, 1, num_sampling_steps=steps)  # no x0 clamp: the slope is the schedule's
    s = head.gen_schedule
    for j in range(head.num_steps - 1):  # the last step is deterministic
        k = head.index_of_step(j)
        # the learned-range variance at var_values = -1 is the posterior variance (its smallest std)
        out = torch.cat([torch.zeros(1, 3), -torch.ones(1, 3)], 1)
        post_std = math.exp(0.5 * s.posterior_log_variance_clipped[k])
        measured = _mean_slope_over_std(head, j, out, slice(0, 3), post_std)
        assert head.score_gain(j) == pytest.approx(measured, rel=1e-3)
    with pytest.raises(ValueError, match="deterministic"):
        head.score_gain(head.num_steps - 1)


def test_ddpm_score_gain_on_the_respaced_cosine_schedule_flags_the_first_and_last_steps():
    from margrpo.rl.selection import scorable_head_steps

    head = DdpmHead(3, 4, 8, 1, num_sampling_steps=10)
    gains = [head.score_gain(j) for j in range(9)]
    # alpha-bar of the first respaced step is about 2.4e-9: x0 = 20,000 (x - eps) and the mean moves ~3,500 std
    assert 3000 < gains[0] < 4000 and 20 < gains[8] < 40 and all(0.9 < g < 2 for g in gains[1:8])
    assert scorable_head_steps(head, 3.0) == [1, 2, 3, 4, 5, 6, 7]
    assert scorable_head_steps(head, 1e4) == list(range(9))
    with pytest.raises(ValueError, match="head_step_max_gain"):
        scorable_head_steps(head, 0.5)


@pytest.mark.parametrize("shift,noise_level", [(1.0, 0.7), (3.0, 0.7), (3.0, 0.3)])
def test_flow_score_gain_is_the_mean_slope_over_the_std_and_stays_below_its_bound(shift, noise_level):
    head = FlowHead(3, 4, 8, 1, num_sampling_steps=12, noise_level=noise_level, shift=shift)
    bound = (1 + noise_level**2 / 2) / noise_level
    for j in range(head.num_steps):
        measured = _mean_slope_over_std(head, j, torch.zeros(1, 3), slice(0, 3), None)
        assert head.score_gain(j) == pytest.approx(measured, rel=1e-3)
        assert head.score_gain(j) <= bound + 1e-9  # no step's score is dominated by noise at this noise level


class _OutputFromCondition(torch.nn.Module):
    """A head network whose output is the first channels of its condition (so each CFG branch can be moved alone)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x, t, z):
        return z[:, : self.channels]


@pytest.mark.parametrize("guidance,temperature", [(1.0, 0.5), (3.0, 1.0), (4.0, 0.7)])
def test_score_gain_grows_with_guidance_and_shrinks_with_temperature_as_the_step_does(guidance, temperature):
    """Moving the conditional branch's output alone under CFG moves the guided mean `guidance` times as far, and the
    temperature scales the std: the measured slope / std must equal score_gain(j, guidance, temperature)."""
    from margrpo.rl.selection import scorable_head_steps

    head = FlowHead(3, 4, 8, 1, num_sampling_steps=8, noise_level=0.7)
    head.net = _OutputFromCondition(3)
    x = torch.randn(1, 3, generator=torch.Generator().manual_seed(0))
    z_uncond = torch.zeros(1, 4)
    h = 0.25
    for j in range(head.num_steps):
        means = [head.transition(x, j, torch.full((1, 4), sign * h), z_uncond, guidance, temperature).mean.double()
                 for sign in (1.0, -1.0)]
        std = float(head.transition(x, j, torch.zeros(1, 4), z_uncond, guidance, temperature).std.double().mean())
        measured = float(((means[0] - means[1]) / (2 * h)).abs().mean()) / std
        assert head.score_gain(j, guidance, temperature) == pytest.approx(measured, rel=1e-3)
    ddpm = DdpmHead(3, 4, 8, 1, num_sampling_steps=10)
    assert scorable_head_steps(ddpm, 3.0, guidance=1.0) == [1, 2, 3, 4, 5, 6, 7]
    assert len(scorable_head_steps(ddpm, 3.0, guidance=2.5)) < 7  # cfg 2.5 lifts some middle steps above 3
