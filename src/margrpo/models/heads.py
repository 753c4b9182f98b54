"""Per-token diffusion heads: a network composed with a scheduler, behind one interface.

A head is `net` (an `nn.Module` that predicts eps or a velocity from (x_t, t, z)) plus `scheduler` (a
`schedulers.DdpmScheduler` or `schedulers.FlowMatchScheduler`, which turns a prediction into the step's Gaussian
and owns the timesteps and the training-noise law), as diffusers composes a model and a scheduler. The sampler and
the RL losses ask a head:

* `transition(x, j, z, z_uncond, guidance, temperature)` (also the module's `forward`, so that DDP and FSDP2
  hooks fire): mean and std of x^{j+1} given x^j at sampling step j (j = 0 is the noisiest), with
  classifier-free guidance applied to the network prediction exactly as at sampling;
* `score_transitions(x, js, z, ...)`: mean, std and log-probability of recorded states x[j] -> x[j+1] at head
  steps `js` (the rollout records with it, the loss recomputes with it: one definition of a transition's
  log-probability is what makes the recomputed ones equal the recorded ones);
* `is_stochastic(j)`: whether step j adds noise (a deterministic step has no log-probability);
* `set_sampling_steps(T)`: a new sampling chain (the scheduler's `set_timesteps`; the network is unchanged);
* `init_noise(...)` and `sample_step(...)`: the starting x^0 ~ N(0, I) and one draw from a transition;
* `loss(target, z)`: the pretraining loss.

Log-probabilities are computed by `gaussian_log_prob` in float32 whatever the autocast dtype,
because the PPO ratio exp(logp_new - logp_old) amplifies any rounding error.

Two heads exist: `DdpmHead` (MAR / Harmon: epsilon prediction, learned-range variance, cosine
schedule respaced to the sampling step count) and `FlowHead` (NOVA-style velocity prediction with the
Flow-GRPO SDE step of noise level `a`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from margrpo.models.mlp_net import SimpleMLPAdaLN
from margrpo.models.schedulers import DdpmScheduler, FlowMatchScheduler, Transition

__all__ = ["DdpmHead", "DiffusionHead", "FlowHead", "ScoredTransitions", "Transition", "gaussian_log_prob"]

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; mean, std^2), always in float32 (autocast-proof)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        mean = mean.float()
        std = std.float()
        return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI


@dataclass
class ScoredTransitions:
    """Mean, std and log-probability of recorded transitions at head steps `js`: each [J, ..., N, C] float32."""

    js: list[int]
    mean: torch.Tensor
    std: torch.Tensor
    logp: torch.Tensor


def _guided(out_c: torch.Tensor, out_u: torch.Tensor | None, guidance: float) -> torch.Tensor:
    if out_u is None:
        return out_c
    return out_u + guidance * (out_c - out_u)


class DiffusionHead(nn.Module):
    """What every head shares: the network call with optional classifier-free guidance, and the scheduler's
    chain (step count, stochastic steps, score gain, training-noise levels)."""

    token_dim: int
    net: SimpleMLPAdaLN
    scheduler: DdpmScheduler | FlowMatchScheduler

    @property
    def num_steps(self) -> int:
        return self.scheduler.num_steps

    def set_sampling_steps(self, num_sampling_steps: str | int) -> None:
        """Respace the sampling chain to `num_sampling_steps`: a new schedule, the same network."""
        self.scheduler.set_timesteps(num_sampling_steps)

    def is_stochastic(self, j: int) -> bool:
        return self.scheduler.is_stochastic(j)

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

    def unit_score_gain(self, j: int) -> float:
        """`score_gain` without guidance and at temperature 1 (the scheduler's)."""
        return self.scheduler.unit_score_gain(j)

    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:
        """Map u in [0, 1) to the `t` that `loss` draws by default (its inverse CDF).

        Why: stratified u (one draw per stratum) gives the same expected loss with less variance.
        """
        return self.scheduler.loss_noise_levels(u)

    def forward(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                guidance: float = 1.0, temperature: float = 1.0) -> Transition:
        """The transition of head step j for states x [..., N, C] under per-token conditions z [N, D].

        Leading axes of x (K chains of the same N tokens) broadcast over the conditions: every network here
        computes its conditioning (time and z embeddings, the AdaLN modulations: most of its work) once per
        token and applies it to all chains, which is what makes MTE's K extra chains cheap.
        """
        if not 0 <= j < self.num_steps:  # a DDPM index would wrap round to another step silently
            raise IndexError(f"head step {j} is outside the sampling chain (steps 0..{self.num_steps - 1})")
        return self.transition(x, j, z, z_uncond, guidance, temperature)

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:  # pragma: no cover
        raise NotImplementedError

    def score_transitions(self, x: torch.Tensor, js: Sequence[int], z: torch.Tensor,
                          z_uncond: torch.Tensor | None = None, guidance: float | torch.Tensor = 1.0,
                          temperature: float = 1.0) -> ScoredTransitions:
        """Mean, std and log-probability of x[j] -> x[j+1] for each head step j in `js` ([J, ..., N, C] float32).

        `x` is a trajectory stack [T+1, ..., N, C] (axes between the first and the token axis, K chains of the same
        tokens, broadcast over the conditions z [N, D]); guided when `z_uncond` is given. Every step goes through
        the module call, so DDP and FSDP2 hooks fire.
        """
        means, stds, logps = [], [], []
        for j in js:
            if not self.is_stochastic(j):
                raise ValueError(f"head step {j} is deterministic and has no log-probability")
            tr = self(x[j], j, z, z_uncond, guidance if z_uncond is not None else 1.0, temperature)
            means.append(tr.mean)
            stds.append(tr.std)
            logps.append(gaussian_log_prob(x[j + 1], tr.mean, tr.std))
        return ScoredTransitions(js=list(js), mean=torch.stack(means), std=torch.stack(stds), logp=torch.stack(logps))

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

    def _net_out(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor,
                 z_uncond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the net on the conditional (and, when guided, unconditional) condition in one batch.

        Inputs are cast to the net's weight dtype (a no-op for float32 weights): a model loaded in bfloat16
        (Harmon's `dtype=`) gets the sampler's float32 chain states; the step arithmetic stays float32.
        """
        w = next(self.parameters(), None)  # the head's weights (its network's, or NOVA's head-level ones)
        if w is not None and w.is_floating_point():
            x, z = x.to(w.dtype), z.to(w.dtype)
            z_uncond = z_uncond.to(w.dtype) if z_uncond is not None else None
        if z_uncond is None:
            return self.net(x, t, z), None
        n = x.shape[-2]  # the token axis (x may carry leading chain axes, see `forward`)
        out = self.net(torch.cat([x, x], -2), torch.cat([t, t], 0), torch.cat([z, z_uncond], 0))
        return out[..., :n, :], out[..., n:, :]

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

    def bridge_chains(self, x0: torch.Tensor, k: int, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """K chains [K, T+1, N, C] of the forward process's reverse given the final values x0 [N, C] (the
        scheduler's `bridge_step`): trajectories the head could have taken that end at x0. No network call.

        Why: the MTE of the MAR-GRPO release averages the policy term over K fresh head chains that never reach the
        image, so the reward does not depend on them and, scored under the condition that drew them, their score
        has zero mean (docs/design.md, "MTE"). Chains that end at the committed value keep the token's own
        contribution: the expected score of a bridge step is the gradient of minus the head's denoising error on
        x0 at that step (the matching estimator's signal, on the scored head steps)."""
        if k < 1:
            raise ValueError(f"bridge_chains needs k >= 1 chains, got {k}")
        x0 = x0.float()[None].expand(k, *x0.shape)
        x = self.scheduler.bridge_start(x0, self.init_noise(tuple(x0.shape), generator, x0.device))
        states = [x]
        for j in range(self.num_steps):
            x = self.sample_step(self.scheduler.bridge_step(x, j, x0, temperature), j, generator)
            states.append(x)
        return torch.stack(states, dim=1)

    def sample(self, z: torch.Tensor, z_uncond: torch.Tensor | None = None, guidance: float = 1.0,
               temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full chain for conditions z [N, D]; returns the clean tokens [N, C] (float32)."""
        x = self.init_noise((z.shape[0], self.token_dim), generator, z.device)
        for j in range(self.num_steps):
            x = self.sample_step(self(x, j, z, z_uncond, guidance, temperature), j, generator)
        return x


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
            eps = _guided(out_c[..., :c].float(), None if out_u is None else out_u[..., :c].float(), guidance)
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


class FlowHead(DiffusionHead):
    """Velocity-prediction flow-matching head on a `FlowMatchScheduler` (the Flow-GRPO SDE step; noise level
    a = 0 gives the deterministic Euler ODE)."""

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int, num_sampling_steps: int = 25,
                 noise_level: float = 0.7, shift: float = 1.0, grad_checkpointing: bool = False,
                 train_sigma_sampling: str = "logit_normal"):
        super().__init__()
        self.token_dim = token_dim
        self.scheduler = FlowMatchScheduler(num_sampling_steps, shift, noise_level, train_sigma_sampling)
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim, z_channels, depth, grad_checkpointing)

    @property
    def sigmas(self) -> np.ndarray:
        """[T + 1] sigmas of the sampling chain, ending in 0 (diffusers' `FlowMatchEulerDiscreteScheduler`)."""
        return self.scheduler.sigmas

    @property
    def noise_level(self) -> float:
        """The SDE step's a (settable; 0 = the Euler ODE)."""
        return self.scheduler.noise_level

    @noise_level.setter
    def noise_level(self, value: float) -> None:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"noise_level must be a finite number >= 0 (0 = the Euler ODE), got {value!r}")
        self.scheduler.noise_level = float(value)

    def transition(self, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None = None,
                   guidance: float = 1.0, temperature: float = 1.0) -> Transition:
        out_c, out_u = self._net_out(x, self.scheduler.net_time(j, z.shape[0], x.device), z, z_uncond)
        with torch.autocast(device_type=x.device.type, enabled=False):
            v = _guided(out_c.float(), None if out_u is None else out_u.float(), guidance)
            return self.scheduler.step(x, j, v, temperature)

    def regression_error(self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
        sig = t.float().unsqueeze(-1)
        v = self.net(self.scheduler.add_noise(target, t, noise), t.float() * 1000.0, z)
        return sig * ((noise - target).float() - v.float())

    def loss(self, target: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample flow-matching MSE on the velocity; `t` here is sigma in (0, 1)."""
        n = target.shape[0]
        if t is None:
            t = self.scheduler.sample_train_levels(n, generator, target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=target.dtype)
        v = self.net(self.scheduler.add_noise(target, t, noise), t.float() * 1000.0, z)
        return ((v.float() - (noise - target).float()) ** 2).mean(dim=-1)
