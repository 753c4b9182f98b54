"""MAR's and Harmon's diffusion head (LTH14/mar's DiffLoss): epsilon prediction with learned-range variance on the
respaced cosine DDPM chain (`schedulers.DdpmScheduler`), and its improved-DDPM training loss."""

from __future__ import annotations

import math

import numpy as np
import torch

from margrpo.models.heads import DiffusionHead, guided_prediction
from margrpo.models.mlp_net import SimpleMLPAdaLN
from margrpo.models.schedulers import DdpmScheduler, Transition


class DdpmHead(DiffusionHead):
    """MAR's DiffLoss head: epsilon prediction with learned-range variance, on a `DdpmScheduler`.

    `clip_denoised` clamps the predicted x0 to [-clip_range, clip_range] before forming the posterior
    mean. Why: at the first respaced step of the cosine schedule x0 = (x - sqrt(1 - a) eps) / sqrt(a)
    with a ~ 1e-9, so an eps error of 0.1 moves the posterior mean by ~170 and the chain never comes
    back; a large, well-trained model (upstream MAR, clip off) predicts eps there almost exactly, a
    small one does not. Pixel tokens clip to [-1, 1]; the shapes autoencoder's unit-std latents to a
    bound just above their largest measured magnitude.
    """

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int,
                 num_sampling_steps: str | int = "100", noise_schedule: str = "cosine",
                 clip_denoised: bool = False, grad_checkpointing: bool = False,
                 diffusion_steps: int = 1000, clip_range: float = 1.0):
        super().__init__()
        self.token_dim = token_dim
        self.scheduler = DdpmScheduler(num_sampling_steps, noise_schedule, diffusion_steps, clip_denoised,
                                       clip_range)
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim * 2, z_channels, depth, grad_checkpointing)

    @property
    def gen_schedule(self):
        """The respaced sampling schedule's float64 arrays (LTH14's `gen_diffusion`)."""
        return self.scheduler.schedule

    @property
    def train_schedule(self):
        """The 1000-step training schedule's float64 arrays (LTH14's `train_diffusion`)."""
        return self.scheduler.train

    def index_of_step(self, j: int) -> int:
        return self.scheduler.index_of_step(j)

    def net_timestep(self, j: int) -> int:
        return self.scheduler.net_timestep(j)

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:
        c = self.token_dim
        out_c, out_u = self._net_out(x, self.scheduler.net_time(j, z.shape[0], x.device), z, z_uncond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            eps = guided_prediction(out_c[..., :c].float(), None if out_u is None else out_u[..., :c].float(), guidance)
            var_values = out_c[..., c:].float()  # the conditional branch's variance, as upstream
            return self.scheduler.step(x, j, eps, var_values, temperature)

    # ------------------------------------------------------------------ pretraining loss
    def regression_error(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
        out = self.net(self.scheduler.add_noise(target, t, noise), t, z)
        return out[:, :self.token_dim].float() - noise.float()

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample improved-DDPM hybrid loss (MSE on eps + VLB for the variance), as MAR trains.

        Returns [N]. `t` and `noise` may be given for reproducible tests.
        """
        s = self.scheduler.train
        n = target.shape[0]
        if t is None:
            t = self.scheduler.sample_train_levels(n, generator, target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)

        def ex(arr: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(arr).to(target.device)[t].float().unsqueeze(-1)

        x_t = self.scheduler.add_noise(target, t, noise)
        out = self.net(x_t, t, z)
        c = self.token_dim
        eps, var_values = out[:, :c], out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=-1)
        # VLB term trains only the variance: the mean uses a detached eps (upstream `frozen_out`).
        true_mean = ex(s.posterior_mean_coef1) * target + ex(s.posterior_mean_coef2) * x_t
        true_log_var = ex(s.posterior_log_variance_clipped)
        x0 = ex(s.sqrt_recip_alphas_cumprod) * x_t - ex(s.sqrt_recipm1_alphas_cumprod) * eps.detach()
        p_mean = ex(s.posterior_mean_coef1) * x0 + ex(s.posterior_mean_coef2) * x_t
        frac = (var_values + 1) / 2
        p_log_var = frac * ex(np.log(s.betas)) + (1 - frac) * ex(s.posterior_log_variance_clipped)
        kl = 0.5 * (-1.0 + p_log_var - true_log_var + torch.exp(true_log_var - p_log_var)
                    + (true_mean - p_mean) ** 2 * torch.exp(-p_log_var))
        kl = kl.mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(target, p_mean, 0.5 * p_log_var).mean(dim=-1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of 8-bit-discretised data in [-1, 1] (improved DDPM's decoder NLL at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
