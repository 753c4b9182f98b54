"""The AR schedule and the schedulers' noise tables against hand-computed values and upstream's formulas."""

import math

import numpy as np
import pytest

from margrpo.models.ar_schedule import guidance_at_step, mask_len_after_step, mask_schedule
from margrpo.models.schedulers import DdpmSchedule, cosine_betas, flow_sde_std, flow_sigmas, space_timesteps


@pytest.mark.parametrize("n,L", [(1, 16), (4, 16), (8, 64), (16, 64), (64, 256), (64, 1024), (256, 256)])
def test_mask_schedule_sums_to_L_and_predicts_every_step(n, L):
    counts = mask_schedule(n, L)
    assert len(counts) == n and sum(counts) == L and min(counts) >= 1


def test_mask_schedule_hand_worked():
    # L=16, N=4: floor(16 cos(pi/8))=14, floor(16 cos(pi/4))=11, floor(16 cos(3pi/8))=6, then the rest.
    assert mask_schedule(4, 16) == [2, 3, 5, 6]
    assert mask_len_after_step(0, 4, 16, 16) == 14
    # clamped to still_masked - 1 and to at least 1
    assert mask_len_after_step(0, 2, 4, 2) == 1
    assert mask_len_after_step(3, 4, 16, 6) == 1  # upstream's value at the last step (floor(0) -> 1)


def test_mask_schedule_rejects_too_many_steps():
    with pytest.raises(ValueError, match="exceeds"):
        mask_schedule(17, 16)


def test_guidance_schedule_endpoints():
    L = 256
    assert guidance_at_step(3.0, "constant", L, 200) == 3.0
    # linear: 1 + (cfg-1)(L - mask_len)/L: ~1 when almost all tokens stay masked, cfg when none do
    assert guidance_at_step(3.0, "linear", L, L) == pytest.approx(1.0)
    assert guidance_at_step(3.0, "linear", L, 0) == pytest.approx(3.0)
    assert guidance_at_step(4.0, "linear", L, 128) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="valid"):
        guidance_at_step(3.0, "cosine", L, 1)


def test_cosine_betas_hand_values():
    betas = cosine_betas(1000)
    ab = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert betas[0] == pytest.approx(1 - ab(0.001) / ab(0.0), rel=1e-12)
    assert betas[500] == pytest.approx(1 - ab(0.501) / ab(0.5), rel=1e-12)
    assert betas[-1] == 0.999  # clipped at max_beta


def test_space_timesteps_matches_improved_ddpm():
    assert space_timesteps(1000, "10") == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(100, "ddim10") == list(range(0, 100, 10))
    assert space_timesteps(10, "10") == list(range(10))
    assert len(space_timesteps(1000, "100")) == 100
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_schedule_preserves_alphas_cumprod():
    base = DdpmSchedule.create(1000, "cosine", 1000)
    s = DdpmSchedule.create("25", "cosine", 1000)
    assert s.num_steps == 25
    np.testing.assert_allclose(s.alphas_cumprod, base.alphas_cumprod[s.timestep_map], rtol=1e-9)
    # posterior quantities follow the improved-DDPM formulas
    ac, acp, b = s.alphas_cumprod, s.alphas_cumprod_prev, s.betas
    np.testing.assert_allclose(s.posterior_variance, b * (1 - acp) / (1 - ac))
    np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]))
    np.testing.assert_allclose(s.posterior_mean_coef2, (1 - acp) * np.sqrt(1 - b) / (1 - ac))


def test_flow_sigmas_unshifted_by_hand():
    np.testing.assert_allclose(flow_sigmas(4), [1.0, 0.667, 0.334, 0.001, 0.0], atol=1e-12)


@pytest.mark.parametrize("shift", [1.0, 1.5, 3.0, 5.0, 10.0])
@pytest.mark.parametrize("steps", [1, 4, 10, 25, 50])
def test_flow_sigmas_equal_diffusers_set_timesteps(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(flow_sigmas(steps, shift), ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)


def test_flow_sigmas_shift_enters_the_low_end_twice_as_in_diffusers():
    """The case a new user met: shift 3, 10 steps; diffusers' last non-zero sigma is 0.0089, not 0.0030."""
    assert flow_sigmas(10, shift=3.0)[-2] == pytest.approx(0.008929, abs=2e-6)


def test_flow_sde_std_uses_next_sigma_at_one():
    sig = flow_sigmas(4)
    std = flow_sde_std(sig, 0.7)
    expected0 = 0.7 * math.sqrt(1.0 / (1 - sig[1])) * math.sqrt(sig[0] - sig[1])
    assert std[0] == pytest.approx(expected0)
    expected2 = 0.7 * math.sqrt(sig[2] / (1 - sig[2])) * math.sqrt(sig[2] - sig[3])
    assert std[2] == pytest.approx(expected2)
    assert np.all(np.isfinite(std))
