"""NOVA-style diffusion head: velocity prediction on `schedulers.FlowMatchScheduler` (the Flow-GRPO SDE step of noise
level a; a = 0 is the deterministic Euler ODE)."""

from __future__ import annotations

import math

import numpy as np
import torch

from margrpo.models.heads import DiffusionHead, guided_prediction
from margrpo.models.mlp_net import SimpleMLPAdaLN
from margrpo.models.schedulers import FlowMatchScheduler, Transition


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
            v = guided_prediction(out_c.float(), None if out_u is None else out_u.float(), guidance)
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
