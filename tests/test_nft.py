"""DiffusionNFT (`algorithm.estimator: nft`): the loss against its explicit formula, and its first-step gradient."""

import pytest
import torch

from margrpo.models.ddpm_head import DdpmHead
from margrpo.models.flow_head import FlowHead
from margrpo.rl.config import AlgorithmSection
from margrpo.rl.loss_terms import nft_terms, stratified_uniform


class LinearHead(torch.nn.Module):
    """A head whose regression error is W z - target: hand-checkable, linear in z like the real heads' errors."""

    def __init__(self, c: int, d: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(c, d, generator=torch.Generator().manual_seed(3)))

    def loss_noise_levels(self, u):
        return u

    def regression_error(self, target, z, t, noise):
        return z @ self.w.T - target + 0.1 * t[:, None] * noise


def test_nft_loss_equals_the_explicit_formula_on_hand_made_tensors():
    head = LinearHead(3, 5)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.3, -0.7]])
    z_old = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    z_new = z_old + 0.3 * torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    adv = torch.tensor([7.0, -1.5])[None, :, None]  # the first beyond A_max = 5: r clamps to 1
    cfg = AlgorithmSection(estimator="nft", mte_k=0, noise_draws=2, nft_beta=0.5, nft_adv_clip=5.0)
    cache: dict = {}
    nft_terms(head, target, z_old, adv, cfg, cache, ("k",), True, torch.Generator().manual_seed(9))
    loss, _ = nft_terms(head, target, z_new, adv, cfg, cache, ("k",), False, torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)  # the draws, written out: stratified levels, then the noise
    t = stratified_uniform(2, 2, g, "cpu").reshape(-1)
    noise = torch.randn(4, 3, generator=g)
    with torch.no_grad():
        e_old = head.regression_error(target.repeat(2, 1), z_old.repeat(2, 1), t, noise).reshape(2, 2, 3)
        e_new = head.regression_error(target.repeat(2, 1), z_new.repeat(2, 1), t, noise).reshape(2, 2, 3)
    expected = torch.empty(2, 2)
    for k in range(2):
        for n in range(2):
            r = 1.0 if n == 0 else -1.5 / 5 / 2 + 0.5
            pos = 0.5 * e_new[k, n] + 0.5 * e_old[k, n]
            neg = 1.5 * e_old[k, n] - 0.5 * e_new[k, n]
            lp = (pos**2).sum() / 3 / (pos.abs().sum() / 3)
            ln = (neg**2).sum() / 3 / (neg.abs().sum() / 3)
            expected[k, n] = (r * lp + (1 - r) * ln) / 0.5
    assert loss.shape == (2, 2, 1)
    torch.testing.assert_close(loss[..., 0].detach(), expected, rtol=1e-5, atol=1e-6)


def test_nft_needs_the_old_prediction_of_the_first_epoch():
    head = LinearHead(3, 5)
    with pytest.raises(RuntimeError, match="first PPO epoch"):
        nft_terms(head, torch.zeros(2, 3), torch.zeros(2, 5), torch.zeros(1, 2, 1),
                  AlgorithmSection(estimator="nft", mte_k=0), {}, ("k",), False, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head_cls", [DdpmHead, FlowHead])
def test_nft_first_step_gradient_is_the_advantage_weighted_adaptive_denoising_loss(head_cls):
    """At theta = old: grad = (A / A_max) grad(|e_theta|^2 / w), whatever nft_beta (the form it reduces to)."""
    torch.manual_seed(0)  # module initialisers only
    head = head_cls(4, 8, 16, 2)
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, 0.0])[None, :, None]
    for beta in (1.0, 0.1):
        cfg = AlgorithmSection(estimator="nft", mte_k=0, noise_draws=3, nft_beta=beta, nft_adv_clip=5.0)
        loss, _ = nft_terms(head, target, z, adv, cfg, {}, ("k",), True, torch.Generator().manual_seed(4))
        (got,) = torch.autograd.grad(loss.sum(), z)

        g = torch.Generator().manual_seed(4)
        t = head.loss_noise_levels(stratified_uniform(3, 6, g, "cpu").reshape(-1))
        noise = torch.randn(18, 4, generator=g)
        e = head.regression_error(target.repeat(3, 1), z.repeat(3, 1), t, noise).reshape(3, 6, 4)
        w = e.detach().abs().mean(-1)
        awl = ((adv[..., 0] / 5.0) * (e**2).mean(-1) / w).sum()
        (want,) = torch.autograd.grad(awl, z)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
