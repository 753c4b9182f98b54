"""Schedules shared by every model family: AR mask schedule, guidance schedule, diffusion noise schedules.

These are pure functions of integers and floats so that the sampler, the trainer and the tests all
see one definition. The DDPM arrays follow the improved-DDPM/DiT code that LTH14/mar vendors
(float64 numpy arrays, cast to float32 only when indexed), so that released checkpoints sample
exactly as upstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# AR (mask) schedule
# ----------------------------------------------------------------------------------------------


def mask_len_after_step(step: int, num_steps: int, seq_len: int, still_masked: int) -> int:
    """Tokens that stay masked after AR step `step` (0-based), exactly as LTH14/mar computes it.

    `floor(L * cos(pi/2 * (step+1)/N))`, clamped to [1, still_masked - 1] so that every step predicts
    at least one token. Upstream applies the same formula at the last step (giving 1, which also
    feeds the linear guidance schedule) and then predicts everything left regardless; the sampler
    does the same.
    """
    ratio = math.cos(math.pi / 2.0 * (step + 1) / num_steps)
    mask_len = math.floor(seq_len * ratio)
    return int(max(1, min(still_masked - 1, mask_len)))


def mask_schedule(num_steps: int, seq_len: int) -> list[int]:
    """Tokens predicted at each AR step; the counts sum to `seq_len`.

    Raises if `num_steps > seq_len` (a step would have to predict zero tokens).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps > seq_len:
        raise ValueError(f"num_steps={num_steps} exceeds the number of tokens {seq_len}")
    counts = []
    masked = seq_len
    for step in range(num_steps):
        nxt = 0 if step == num_steps - 1 else mask_len_after_step(step, num_steps, seq_len, masked)
        counts.append(masked - nxt)
        masked = nxt
    return counts


def guidance_at_step(scale: float, schedule: str, seq_len: int, mask_len_next: int) -> float:
    """Classifier-free guidance scale for one AR step (LTH14/mar, following Muse).

    `linear`: 1 + (scale - 1) * (L - mask_len_next) / L, where mask_len_next is the number of
    tokens still masked after this step; it grows from ~1 to `scale`. `constant`: `scale`.
    """
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * (seq_len - mask_len_next) / seq_len
    if schedule == "constant":
        return float(scale)
    raise ValueError(f"unknown guidance schedule {schedule!r}; valid: 'linear', 'constant'")


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
