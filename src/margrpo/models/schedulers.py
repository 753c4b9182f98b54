"""Schedulers: the Gaussian law of each sampling step and the training-noise law of a per-token diffusion head.

A head (`heads.py`) composes a network, which predicts eps or a velocity from (x_t, t, z), and one of these
scheduler objects, as diffusers composes a model and a scheduler: the scheduler alone knows the timesteps or
sigmas, turns a (guided) prediction into the next step's mean and std, and says how training draws noise levels.
`set_timesteps` changes the sampling chain and never touches the network.

* `DdpmScheduler`: MAR's and Harmon's improved-DDPM chain (cosine schedule, respaced to `num_sampling_steps` as
  LTH14/mar's `create_diffusion`, learned-range variance, optional x0 clamp).
* `FlowMatchScheduler`: diffusers' `FlowMatchEulerDiscreteScheduler` sigmas with the Flow-GRPO SDE step
  (noise level `a`; a = 0 is the Euler ODE).

Step arithmetic is float32 whatever the autocast dtype: the PPO ratio exp(logp_new - logp_old) amplifies rounding.
The schedulers' tables follow the improved-DDPM/DiT code that LTH14/mar vendors (float64 numpy arrays, cast to
float32 only when indexed), so that released checkpoints sample exactly as upstream, and diffusers' flow sigmas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# DDPM (improved DDPM / DiT / MAR)
# ----------------------------------------------------------------------------------------------


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal cosine schedule, discretised as in improved-DDPM `betas_for_alpha_bar`."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_timesteps):
        t1 = i / num_timesteps
        t2 = (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """The DDPM linear schedule scaled to `num_timesteps` (improved-DDPM `get_named_beta_schedule`)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which base timesteps a respaced sampler keeps (improved-DDPM `space_timesteps`).

    `"100"` keeps 100 evenly strided steps out of `num_timesteps`; `"10,15,20"` splits the range in
    three sections; `"ddimN"` uses DDIM's integer stride. Returns the sorted kept timesteps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return sorted(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")] if section_counts else [num_timesteps]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


@dataclass(frozen=True)
class DdpmSchedule:
    """All float64 arrays of a (possibly respaced) Gaussian diffusion, indexed by respaced step k.

    `timestep_map[k]` is the base timestep fed to the network (MAR passes the *original* timestep,
    `rescale_timesteps=False`). Sampling runs k = K-1, ..., 0.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @staticmethod
    def from_betas(betas: np.ndarray, timestep_map: np.ndarray | None = None) -> DdpmSchedule:
        betas = np.asarray(betas, dtype=np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        if len(post_var) > 1:
            post_log_var = np.log(np.append(post_var[1], post_var[1:]))
        else:  # a single step has posterior variance 0; upstream gives an empty array here
            post_log_var = np.log(np.maximum(post_var, 1e-20))
        return DdpmSchedule(
            betas=betas,
            timestep_map=np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map),
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
        )

    @staticmethod
    def create(num_sampling_steps: str | int = "100", noise_schedule: str = "cosine",
               diffusion_steps: int = 1000) -> DdpmSchedule:
        """Respaced schedule as `create_diffusion(timestep_respacing, noise_schedule)` in MAR."""
        if noise_schedule == "cosine":
            base = cosine_betas(diffusion_steps)
        elif noise_schedule == "linear":
            base = linear_betas(diffusion_steps)
        else:
            raise ValueError(f"unknown noise_schedule {noise_schedule!r}; valid: 'cosine', 'linear'")
        if num_sampling_steps in ("", None):
            num_sampling_steps = diffusion_steps
        use = set(space_timesteps(diffusion_steps, str(num_sampling_steps)))
        base_ac = np.cumprod(1.0 - base)
        last = 1.0
        new_betas, tmap = [], []
        for i, a in enumerate(base_ac):
            if i in use:
                new_betas.append(1 - a / last)
                last = a
                tmap.append(i)
        return DdpmSchedule.from_betas(np.array(new_betas), np.array(tmap))


# ----------------------------------------------------------------------------------------------
# Flow matching (NOVA / diffusers FlowMatchEulerDiscreteScheduler)
# ----------------------------------------------------------------------------------------------


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000,
                sampling_shift: float | None = None) -> np.ndarray:
    """Sigmas of diffusers' `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`, plus a final 0.

    `sampling_shift` is diffusers' `set_shift(s)` before `set_timesteps` (NOVA's `flow_shift`): the construction
    shift still fixes sigma_min and sigma_max, the sampling shift replaces it in the second shift.

    As diffusers does: the training sigmas t / N (t = 1..N) are shifted, `s * sigma / (1 + (s - 1) * sigma)`, and
    their ends give sigma_max and sigma_min; the inference sigmas are a linspace between those two in timestep
    units, shifted again. So the shift enters the low end twice (shift 3, 10 steps: last non-zero sigma 0.0089,
    not the 0.0030 of shifting a linspace from 1 to 1/N once); tests/test_schedules.py checks every value against
    diffusers. Returns num_steps + 1 values, decreasing, ending at 0.
    """

    def shifted(sigma, s=shift):
        return s * sigma / (1 + (s - 1) * sigma)

    sigma_min, sigma_max = shifted(1.0 / num_train_timesteps), shifted(1.0)
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = shifted(timesteps / num_train_timesteps, shift if sampling_shift is None else sampling_shift)
    return np.append(sigmas, 0.0).astype(np.float64)


def flow_sde_std(sigmas: np.ndarray, noise_level: float) -> np.ndarray:
    """Per-step noise std of the Flow-GRPO SDE step, `a * sqrt(sigma / (1 - sigma~)) * sqrt(-dt)`.

    sigma~ is the next sigma when sigma == 1 (Flow-GRPO's `sigma_max = sigmas[1]`), which keeps the
    first step finite. Returns the std of x_{j+1} given x_j for j = 0..T-1.
    """
    sigma = sigmas[:-1]
    sigma_next = sigmas[1:]
    denom_sigma = np.where(sigma == 1.0, sigmas[1], sigma)
    std_dev_t = noise_level * np.sqrt(sigma / (1 - denom_sigma))
    return std_dev_t * np.sqrt(sigma - sigma_next)


@dataclass
class Transition:
    """Gaussian law of the next head state: x^{j+1} ~ N(mean, std^2), both float32 [N, C].

    `clamped` [N, C] bool marks elements whose predicted x0 a clamping head clipped (None for other heads):
    their mean does not depend on the network there.
    """

    mean: torch.Tensor
    std: torch.Tensor
    clamped: torch.Tensor | None = None


class DdpmScheduler:
    """The respaced DDPM chain: eps prediction and learned-range variance -> posterior mean and std.

    Step j = 0 is the noisiest; it uses respaced index k = T - 1 - j, and the network sees the *original* timestep
    `timestep_map[k]` (MAR's `rescale_timesteps=False`). `clip_denoised` clamps the predicted x0 to
    [-clip_range, clip_range] before the posterior mean (see `heads.DdpmHead` for why).
    """

    def __init__(self, num_sampling_steps: str | int = "100", noise_schedule: str = "cosine",
                 num_train_timesteps: int = 1000, clip_denoised: bool = False, clip_range: float = 1.0):
        if not clip_range > 0:
            raise ValueError(f"clip_range must be positive, got {clip_range}")
        self.noise_schedule = noise_schedule
        self.clip_denoised = clip_denoised
        self.clip_range = float(clip_range)
        self.train = DdpmSchedule.create(num_train_timesteps, noise_schedule, num_train_timesteps)
        self.set_timesteps(num_sampling_steps)

    def set_timesteps(self, num_sampling_steps: str | int) -> None:
        """Respace the sampling chain to `num_sampling_steps` ("100", 25, "ddim50", "10,15,20")."""
        if str(num_sampling_steps).strip() in ("0", "-1") or (isinstance(num_sampling_steps, int)
                                                                and num_sampling_steps < 1):
            raise ValueError(f"a sampling chain needs at least one step, got {num_sampling_steps!r}")
        self.schedule = DdpmSchedule.create(num_sampling_steps, self.noise_schedule, self.train.num_steps)
        s = self.schedule
        # float32 copies of the per-step coefficients, as upstream's `_extract_into_tensor(...).float()`
        self._coef = {
            name: torch.from_numpy(np.asarray(getattr(s, name))).float()
            for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                         "posterior_mean_coef2", "posterior_log_variance_clipped")
        }
        self._coef["log_betas"] = torch.from_numpy(np.log(s.betas)).float()

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def index_of_step(self, j: int) -> int:
        """Respaced diffusion index k for sampling step j (k counts down to 0)."""
        return self.num_steps - 1 - j

    def net_timestep(self, j: int) -> int:
        """Base timestep the network sees at sampling step j."""
        return int(self.schedule.timestep_map[self.index_of_step(j)])

    def net_time(self, j: int, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((n,), self.net_timestep(j), device=device, dtype=torch.long)

    def is_stochastic(self, j: int) -> bool:
        return self.index_of_step(j) != 0

    def unit_score_gain(self, j: int) -> float:
        """d mean / d eps = posterior_mean_coef1 * sqrt(1 / alpha-bar - 1) over the posterior std (the learned
        variance's lower bound). On the cosine schedule respaced to 10 steps: about 3,500 at the first step
        (alpha-bar 2.4e-9), 1.0-1.8 in the middle, 29 at the last stochastic step."""
        if not self.is_stochastic(j):
            raise ValueError(f"head step {j} is deterministic and has no score")
        s, k = self.schedule, self.index_of_step(j)
        sensitivity = s.posterior_mean_coef1[k] * s.sqrt_recipm1_alphas_cumprod[k]
        return float(sensitivity / math.exp(0.5 * s.posterior_log_variance_clipped[k]))

    def step(self, x: torch.Tensor, j: int, eps: torch.Tensor, var_values: torch.Tensor,
             temperature: float) -> Transition:
        """Posterior mean and std of step j from the (guided) eps and the variance channels, all float32."""
        k = self.index_of_step(j)
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

    def bridge_start(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The first state of a bridge to x0: x0 noised to the chain's first (noisiest) respaced step."""
        ab = float(self.schedule.alphas_cumprod[self.index_of_step(0)])
        return math.sqrt(ab) * x0.float() + math.sqrt(1.0 - ab) * noise

    def bridge_step(self, x: torch.Tensor, j: int, x0: torch.Tensor, temperature: float) -> Transition:
        """The forward process's reverse step given the final value: q(x^{j+1} | x^j, x0), the DDPM posterior of
        the respaced chain (its mean is the head's step with the exact eps of (x^j, x0); its std the posterior's,
        the learned variance's lower end), the std scaled by `temperature` as the sampler scales the head's.

        A chain of these steps from `bridge_start` is a bridge: its state after step j is distributed as x0 noised to
        that step's diffusion index, and it ends exactly at x0 (the last, deterministic step's posterior mean is x0)."""
        k = self.index_of_step(j)
        mean = self._coef["posterior_mean_coef1"][k] * x0.float() + self._coef["posterior_mean_coef2"][k] * x.float()
        std = torch.exp(0.5 * self._coef["posterior_log_variance_clipped"][k]) * temperature
        return Transition(mean=mean, std=torch.full_like(mean, float(std)))

    # ------------------------------------------------------------------ training-noise law
    def sample_train_levels(self, n: int, generator: torch.Generator | None,
                            device: torch.device | str) -> torch.Tensor:
        """Uniform training timesteps in [0, T)."""
        return torch.randint(0, self.train.num_steps, (n,), generator=generator, device=device)

    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:
        """Uniform training timesteps as a function of u in [0, 1): floor(u T)."""
        n = self.train.num_steps
        return (u * n).floor().long().clamp(0, n - 1)

    def add_noise(self, target: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) noise."""
        s = self.train
        sa = torch.from_numpy(s.sqrt_alphas_cumprod).to(target.device)[t].float().unsqueeze(-1)
        sb = torch.from_numpy(s.sqrt_one_minus_alphas_cumprod).to(target.device)[t].float().unsqueeze(-1)
        return sa * target + sb * noise


class FlowMatchScheduler:
    """Flow matching, x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, with the Flow-GRPO SDE step.

        mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,
        std  = s sqrt(-dt),     s = a sqrt(sigma / (1 - sigma~)),

    with sigma~ the next sigma at sigma = 1, keeps the marginals of the probability-flow ODE and gives every step a
    Gaussian law. `noise_level` a = 0 is the deterministic Euler ODE. Sigmas are diffusers'
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(T)` plus a final 0 (`flow_sigmas`).
    """

    def __init__(self, num_sampling_steps: int = 25, shift: float = 1.0, noise_level: float = 0.7,
                 train_sigma_sampling: str = "logit_normal", sampling_shift: float | None = None,
                 num_train_timesteps: int = 1000):
        if train_sigma_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"train_sigma_sampling={train_sigma_sampling!r}; valid: 'uniform', 'logit_normal'")
        self.shift = float(shift)
        # diffusers' `set_shift` (NOVA's `flow_shift`): the second shift of the sampling sigmas; None = `shift`
        self.sampling_shift = None if sampling_shift is None else float(sampling_shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.noise_level = float(noise_level)
        self.train_sigma_sampling = train_sigma_sampling
        self.set_timesteps(num_sampling_steps)

    def set_timesteps(self, num_sampling_steps: str | int) -> None:
        if int(num_sampling_steps) < 1:
            raise ValueError(f"a sampling chain needs at least one step, got {num_sampling_steps!r}")
        self._num_steps = int(num_sampling_steps)
        self.sigmas = flow_sigmas(self._num_steps, self.shift, self.num_train_timesteps, self.sampling_shift)

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def net_time(self, j: int, n: int, device: torch.device | str) -> torch.Tensor:
        """The network's time input: sigma * 1000 (NOVA's and diffusers' timestep units)."""
        return torch.full((n,), float(self.sigmas[j]) * 1000.0, device=device, dtype=torch.float32)

    def is_stochastic(self, j: int) -> bool:
        return self.noise_level > 0

    def _sde_scale(self, sigma: float) -> float:
        denom = float(self.sigmas[1]) if sigma == 1.0 else sigma
        return self.noise_level * math.sqrt(sigma / (1 - denom))

    def unit_score_gain(self, j: int) -> float:
        """(1 + s^2 (1 - sigma) / (2 sigma)) |dt| / (s sqrt(|dt|)). Since s^2 (1 - sigma) / sigma = a^2, this is
        (1 + a^2 / 2) sqrt(|dt| (1 - sigma~) / sigma) / a: at most (1 + a^2 / 2) / a (1.78 at a = 0.7) at every
        step and shift, so a flow head has no noise-dominated step unless its noise level is small."""
        if not self.is_stochastic(j):
            raise ValueError(f"head step {j} is deterministic and has no score")
        sigma, sigma_next = float(self.sigmas[j]), float(self.sigmas[j + 1])
        dt = sigma - sigma_next
        s = self._sde_scale(sigma)
        return (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt / (s * math.sqrt(dt))

    def step(self, x: torch.Tensor, j: int, v: torch.Tensor, temperature: float) -> Transition:
        """Mean and std of step j from the (guided) velocity, float32."""
        sigma = float(self.sigmas[j])
        sigma_next = float(self.sigmas[j + 1])
        dt = sigma_next - sigma
        xf = x.float()
        if self.noise_level > 0:
            s = self._sde_scale(sigma)
            mean = xf * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
            std_val = s * math.sqrt(-dt) * temperature
        else:
            mean = xf + v * dt
            std_val = 0.0
        return Transition(mean=mean, std=torch.full_like(mean, std_val))

    def bridge_start(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The first state of a bridge to x0: x0 noised to the chain's first sigma."""
        sigma = float(self.sigmas[0])
        return (1.0 - sigma) * x0.float() + sigma * noise

    def bridge_step(self, x: torch.Tensor, j: int, x0: torch.Tensor, temperature: float) -> Transition:
        """Step j with the velocity that carries x^j straight to the final value, v = (x^j - x0) / sigma_j (the
        conditional velocity of the rectified path through x^j and x0), and the step's own noise: a chain of these
        steps is pulled to x0 (with noise level a = 0 it is the straight line and ends exactly at x0; the SDE's
        correction terms leave its last state within O(a^2) of x0)."""
        sigma = float(self.sigmas[j])
        return self.step(x, j, (x.float() - x0.float()) / sigma, temperature)

    # ------------------------------------------------------------------ training-noise law
    def sample_train_levels(self, n: int, generator: torch.Generator | None,
                            device: torch.device | str) -> torch.Tensor:
        """Training sigmas: uniform, or logit-normal (sigmoid of a standard normal)."""
        if self.train_sigma_sampling == "uniform":
            return torch.rand((n,), generator=generator, device=device)
        return torch.sigmoid(torch.randn((n,), generator=generator, device=device))

    def loss_noise_levels(self, u: torch.Tensor) -> torch.Tensor:
        """sigma = u (uniform) or sigmoid(Phi^-1(u)) (logit-normal), u clamped into the open interval."""
        u = u.float().clamp(1e-6, 1 - 1e-6)
        if self.train_sigma_sampling == "uniform":
            return u
        return torch.sigmoid(math.sqrt(2.0) * torch.erfinv(2 * u - 1))

    @staticmethod
    def add_noise(target: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        sig = sigma.float().unsqueeze(-1)
        return (1 - sig) * target + sig * noise
