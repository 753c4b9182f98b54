"""Per-token diffusion heads behind one interface: a Gaussian transition per denoising step.

The sampler and the RL losses only ever ask a head four things:

* `transition(x, j, z, z_uncond, guidance, temperature)`: mean and std of x^{j+1} given x^j at
  sampling step j (j = 0 is the noisiest), with classifier-free guidance applied to the network
  prediction exactly as at sampling;
* `is_stochastic(j)`: whether step j adds noise (a deterministic step has no log-probability);
* `init_noise(...)`: the starting x^0 ~ N(0, I);
* `loss(target, z)`: the pretraining loss.

Log-probabilities are computed by `gaussian_log_prob` in float32 whatever the autocast dtype,
because the PPO ratio exp(logp_new - logp_old) amplifies any rounding error.

Two heads exist: `DdpmHead` (MAR / Harmon: epsilon prediction, learned-range variance, cosine
schedule respaced to the sampling step count) and `FlowHead` (NOVA-style velocity prediction with the
Flow-GRPO SDE step of noise level `a`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from margrpo.models.mlp_net import SimpleMLPAdaLN
from margrpo.models.schedules import DdpmSchedule, flow_sigmas

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; mean, std^2), always in float32 (autocast-proof)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        mean = mean.float()
        std = std.float()
        return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI


@dataclass
class Transition:
    """Gaussian law of the next head state: x^{j+1} ~ N(mean, std^2), both float32 [N, C].

    `clamped` [N, C] bool marks elements whose predicted x0 a clamping head clipped (None for other heads):
    their mean does not depend on the network there.
    """

    mean: torch.Tensor
    std: torch.Tensor
    clamped: torch.Tensor | None = None


def _guided(out_c: torch.Tensor, out_u: torch.Tensor | None, guidance: float) -> torch.Tensor:
    if out_u is None:
        return out_c
    return out_u + guidance * (out_c - out_u)


class DiffusionHead(nn.Module):
    """Common part of the heads: the network call with optional classifier-free guidance."""

    token_dim: int
    net: SimpleMLPAdaLN

    @property
    def num_steps(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_sampling_steps(self, num_sampling_steps: str | int) -> None:  # pragma: no cover - abstract
        """Respace the sampling chain to `num_sampling_steps`; the network is unchanged."""
        raise NotImplementedError

    def is_stochastic(self, j: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_gain(self, j: int, guidance: float = 1.0, temperature: float = 1.0) -> float:
        """|d mean / d conditional network output| / std of stochastic step j: how many standard deviations a unit
        change of the network's prediction moves the step's Gaussian mean (for a learned variance, at its smallest
        std), sampled with `guidance` (the guided output moves `guidance` times the conditional one) and
        `temperature` (which scales the std).

        Why: the score of a recorded transition, d log p / d output = noise / std * d mean / d output, is the
        step's standard-normal draw times this gain. Where it is huge the policy term of that step is noise
        (and its PPO ratio leaves the trust region after a tiny update); the trainer does not score such steps.
        """
        return self.unit_score_gain(j) * guidance / temperature

    def unit_score_gain(self, j: int) -> float:  # pragma: no cover - abstract
        """`score_gain` without guidance and at temperature 1."""
        raise NotImplementedError

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:  # pragma: no cover
        raise NotImplementedError

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def regression_error(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """[N, C] float32 error of the network's prediction on `target` noised to level `t` with `noise`.

        Linear in the prediction, so the error of a mix of two predictions is the same mix of their errors
        (DiffusionNFT's implicit policies). DDPM: eps_hat - eps, the space of its training loss (an x0 error
        would weigh noise levels by sqrt(1 / alpha-bar - 1), which spans six orders of magnitude on the cosine
        schedule). Flow: x0_hat - x0 = sigma (v* - v_hat), DiffusionNFT's space for flow models.
        """
        raise NotImplementedError

    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Map u in [0, 1) to the `t` that `loss` draws by default (its inverse CDF).

        Why: stratified u (one draw per stratum) gives the same expected loss with less variance.
        """
        raise NotImplementedError

    def _net_out(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                 z_uncond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the net on the conditional (and, when guided, unconditional) condition in one batch."""
        if z_uncond is None:
            return self.net(x, t, z), None
        n = x.shape[0]
        out = self.net(torch.cat([x, x], 0), torch.cat([t, t], 0), torch.cat([z, z_uncond], 0))
        return out[:n], out[n:]

    def init_noise(self, shape: tuple[int, ...], generator: torch.Generator | None,
                   device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def sample_step(self, tr: Transition, j: int, generator: torch.Generator | None,
                    noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x^{j+1} from a transition (float32); `noise` overrides the generator's standard normal draw."""
        if not self.is_stochastic(j):
            return tr.mean.clone()
        if noise is None:
            noise = torch.randn(tr.mean.shape, generator=generator, device=tr.mean.device, dtype=torch.float32)
        return tr.mean + tr.std * noise

    def sample(self, z: torch.Tensor, z_uncond: torch.Tensor | None = None, guidance: float = 1.0,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full chain for conditions z [N, D]; returns the clean tokens [N, C] (float32)."""
        x = self.init_noise((z.shape[0], self.token_dim), generator, z.device)
        for j in range(self.num_steps):
            x = self.sample_step(self.transition(x, j, z, z_uncond, guidance, temperature), j, generator)
        return x


class DdpmHead(DiffusionHead):
    """MAR's DiffLoss head: epsilon prediction with learned-range variance.

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
        if not clip_range > 0:
            raise ValueError(f"clip_range must be positive, got {clip_range}")
        self.token_dim = token_dim
        self.clip_denoised = clip_denoised
        self.clip_range = float(clip_range)
        self.noise_schedule = noise_schedule
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim * 2, z_channels, depth, grad_checkpointing)
        self.train_schedule = DdpmSchedule.create(diffusion_steps, noise_schedule, diffusion_steps)
        self.set_sampling_steps(num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps: str | int) -> None:
        """Respace the sampling chain (the network is unchanged; only the Gaussian steps change)."""
        self.gen_schedule = DdpmSchedule.create(num_sampling_steps, self.noise_schedule,
                                                len(self.train_schedule.betas))
        s = self.gen_schedule
        # float32 copies of the per-step coefficients, as upstream's `_extract_into_tensor(...).float()`
        self._coef = {
            name: torch.from_numpy(np.asarray(getattr(s, name))).float()
            for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                         "posterior_mean_coef2", "posterior_log_variance_clipped")
        }
        self._coef["log_betas"] = torch.from_numpy(np.log(s.betas)).float()

    @property
    def num_steps(self) -> int:
        return self.gen_schedule.num_steps

    def index_of_step(self, j: int) -> int:
        """Respaced diffusion index k for sampling step j (k counts down to 0)."""
        return self.num_steps - 1 - j

    def net_timestep(self, j: int) -> int:
        """Base timestep the network sees at sampling step j (MAR maps respaced k to the original t)."""
        return int(self.gen_schedule.timestep_map[self.index_of_step(j)])

    def is_stochastic(self, j: int) -> bool:
        return self.index_of_step(j) != 0

    def unit_score_gain(self, j: int) -> float:
        """d mean / d eps = posterior_mean_coef1 * sqrt(1 / alpha-bar - 1) over the posterior std (the learned
        variance's lower bound). On the cosine schedule respaced to 10 steps: about 3,500 at the first step
        (alpha-bar 2.4e-9), 1.0-1.8 in the middle, 29 at the last stochastic step."""
        if not self.is_stochastic(j):
            raise ValueError(f"head step {j} is deterministic and has no score")
        s, k = self.gen_schedule, self.index_of_step(j)
        sensitivity = s.posterior_mean_coef1[k] * s.sqrt_recipm1_alphas_cumprod[k]
        return float(sensitivity / math.exp(0.5 * s.posterior_log_variance_clipped[k]))

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:
        k = self.index_of_step(j)
        c = self.token_dim
        t = torch.full((x.shape[0],), self.net_timestep(j), device=x.device, dtype=torch.long)
        out_c, out_u = self._net_out(x, t, z, z_uncond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            eps = _guided(out_c[:, :c].float(), None if out_u is None else out_u[:, :c].float(), guidance)
            var_values = out_c[:, c:].float()  # the conditional branch's variance, as upstream
            xf = x.float()
            x0 = self._coef["sqrt_recip_alphas_cumprod"][k] * xf - self._coef["sqrt_recipm1_alphas_cumprod"][k] * eps
            clamped = None
            if self.clip_denoised:
                clamped = x0.abs() > self.clip_range
                x0 = x0.clamp(-self.clip_range, self.clip_range)
            mean = self._coef["posterior_mean_coef1"][k] * x0 + self._coef["posterior_mean_coef2"][k] * xf
            frac = (var_values + 1) / 2
            log_var = frac * self._coef["log_betas"][k] + (1 - frac) * self._coef["posterior_log_variance_clipped"][k]
            std = torch.exp(0.5 * log_var) * temperature
        return Transition(mean=mean, std=std, clamped=clamped)

    # ------------------------------------------------------------------ pretraining loss
    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform training timesteps: floor(u T)."""
        n = self.train_schedule.num_steps
        return (u * n).floor().long().clamp(0, n - 1)

    def regression_error(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
        s = self.train_schedule
        sa = torch.from_numpy(s.sqrt_alphas_cumprod).to(target.device)[t].float().unsqueeze(-1)
        sb = torch.from_numpy(s.sqrt_one_minus_alphas_cumprod).to(target.device)[t].float().unsqueeze(-1)
        out = self.net(sa * target + sb * noise, t, z)
        return out[:, :self.token_dim].float() - noise.float()

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample improved-DDPM hybrid loss (MSE on eps + VLB for the variance), as MAR trains.

        Returns [N]. `t` and `noise` may be given for reproducible tests.
        """
        s = self.train_schedule
        n = target.shape[0]
        if t is None:
            t = torch.randint(0, s.num_steps, (n,), generator=generator, device=target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)

        def ex(arr: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(arr).to(target.device)[t].float().unsqueeze(-1)

        x_t = ex(s.sqrt_alphas_cumprod) * target + ex(s.sqrt_one_minus_alphas_cumprod) * noise
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


class FlowHead(DiffusionHead):
    """Velocity-prediction flow-matching head (x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0).

    Sampling uses the Flow-GRPO SDE step, which keeps the marginals of the probability-flow ODE and
    gives every step a Gaussian law:

        mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,
        std  = s sqrt(-dt),     s = a sqrt(sigma / (1 - sigma~)),

    with sigma~ the next sigma at sigma = 1. `noise_level` a = 0 gives the deterministic Euler ODE.
    """

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int, num_sampling_steps: int = 25,
                 noise_level: float = 0.7, shift: float = 1.0, grad_checkpointing: bool = False,
                 train_sigma_sampling: str = "logit_normal"):
        super().__init__()
        if train_sigma_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"train_sigma_sampling={train_sigma_sampling!r}; valid: 'uniform', 'logit_normal'")
        self.token_dim = token_dim
        self.noise_level = float(noise_level)
        self.shift = float(shift)
        self.train_sigma_sampling = train_sigma_sampling
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim, z_channels, depth, grad_checkpointing)
        self.set_sampling_steps(num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps: str | int) -> None:
        self._num_steps = int(num_sampling_steps)
        self.sigmas = flow_sigmas(self._num_steps, self.shift)

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def is_stochastic(self, j: int) -> bool:
        return self.noise_level > 0

    def unit_score_gain(self, j: int) -> float:
        """(1 + s^2 (1 - sigma) / (2 sigma)) |dt| / (s sqrt(|dt|)). Since s^2 (1 - sigma) / sigma = a^2, this is
        (1 + a^2 / 2) sqrt(|dt| (1 - sigma~) / sigma) / a: at most (1 + a^2 / 2) / a (1.78 at a = 0.7) at every
        step and shift, so a flow head has no noise-dominated step unless its noise level is small."""
        if not self.is_stochastic(j):
            raise ValueError(f"head step {j} is deterministic and has no score")
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        dt = sigma - sigma_next
        denom = float(self.sigmas[1]) if sigma == 1.0 else sigma
        s = self.noise_level * math.sqrt(sigma / (1 - denom))
        return (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt / (s * math.sqrt(dt))

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:
        sigma = float(self.sigmas[j])
        sigma_next = float(self.sigmas[j + 1])
        dt = sigma_next - sigma
        t = torch.full((x.shape[0],), sigma * 1000.0, device=x.device, dtype=torch.float32)
        out_c, out_u = self._net_out(x, t, z, z_uncond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            v = _guided(out_c.float(), None if out_u is None else out_u.float(), guidance)
            xf = x.float()
            if self.noise_level > 0:
                denom = float(self.sigmas[1]) if sigma == 1.0 else sigma
                s = self.noise_level * math.sqrt(sigma / (1 - denom))
                mean = xf * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
                std_val = s * math.sqrt(-dt) * temperature
            else:
                mean = xf + v * dt
                std_val = 0.0
            std = torch.full_like(mean, std_val)
        return Transition(mean=mean, std=std)

    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:
        """sigma = u (uniform) or sigmoid(Phi^-1(u)) (logit-normal), u clamped into the open interval."""
        u = u.float().clamp(1e-6, 1 - 1e-6)
        if self.train_sigma_sampling == "uniform":
            return u
        return torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2 * u - 1))

    def regression_error(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
        sig = t.float().unsqueeze(-1)
        v = self.net((1 - sig) * target + sig * noise, t.float() * 1000.0, z)
        return sig * ((noise - target).float() - v.float())

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample flow-matching MSE on the velocity; `t` here is sigma in (0, 1)."""
        n = target.shape[0]
        if t is None:
            if self.train_sigma_sampling == "uniform":
                t = torch.rand((n,), generator=generator, device=target.device)
            else:
                t = torch.sigmoid(torch.randn((n,), generator=generator, device=target.device))
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        sig = t.float().unsqueeze(-1)
        x_s = (1 - sig) * target + sig * noise
        v = self.net(x_s, t.float() * 1000.0, z)
        return ((v.float() - (noise - target).float()) ** 2).mean(dim=-1)
