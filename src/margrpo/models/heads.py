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
* `sample_chain(z, ...)` / `sample_chains(z, ..., k)`: a token's whole chain of head steps (recorded with its
  log-probabilities when asked), or K chains of the same tokens in one call per step (MTE's);
* `loss(target, z)`: the pretraining loss.

Log-probabilities are computed by `gaussian_log_prob` in float32 whatever the autocast dtype,
because the PPO ratio exp(logp_new - logp_old) amplifies any rounding error.

Two heads exist: `ddpm_head.DdpmHead` (MAR / Harmon: epsilon prediction, learned-range variance, cosine schedule
respaced to the sampling step count) and `flow_head.FlowHead` (NOVA-style velocity prediction with the Flow-GRPO SDE
step of noise level `a`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from margrpo.models.mlp_net import SimpleMLPAdaLN
from margrpo.models.schedulers import DdpmScheduler, FlowMatchScheduler, Transition

__all__ = ["DiffusionHead", "ScoredTransitions", "Transition", "check_finite", "gaussian_log_prob", "guided_prediction",
           "split_noise"]

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


def guided_prediction(out_c: torch.Tensor, out_u: torch.Tensor | None, guidance: float) -> torch.Tensor:
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
        """The transition of head step j for states x [..., N, C] under per-token z [N, D].

        Leading axes of x (K chains of the same N tokens) broadcast over z: every network here
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
        tokens, broadcast over z [N, D]); guided when `z_uncond` is given. Every step goes through
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
        image, so the reward does not depend on them and, scored under the z that drew them, their score
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

    def sample_chain(self, z: torch.Tensor, z_uncond: torch.Tensor | None, guidance: float | torch.Tensor,
                     temperature: float, generator: torch.Generator | None, record: bool,
                     noise: Callable[[], torch.Tensor] | None = None, finite: list[torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The whole chain for N tokens under their z [N, D]: the final x [N, C] and, if `record`, the x and
        logp stacks ([T+1, N, C], [T, N, C]; a deterministic step's log-probability is 0).

        `noise()` (if given) supplies each standard-normal draw [N, C] instead of `generator`, or [K, N, C] for K
        chains of the same N tokens (the network broadcasts the chain axis over z). With `finite` (a list), the
        all-finite flag is appended as a tensor for the caller to check once (`check_finite`) instead of being read
        here: reading it is a device-to-host sync per call, i.e. per AR step.
        """
        x = noise() if noise is not None else self.init_noise((z.shape[0], self.token_dim), generator, z.device)
        xs, logps = [x], []
        for j in range(self.num_steps):
            tr = self(x, j, z, z_uncond, guidance if z_uncond is not None else 1.0, temperature)
            eps = noise() if (noise is not None and self.is_stochastic(j)) else None
            x = self.sample_step(tr, j, generator, eps)
            if record:
                xs.append(x)
                if self.is_stochastic(j):
                    logps.append(gaussian_log_prob(x, tr.mean, tr.std))
                else:
                    logps.append(torch.zeros_like(x))
        ok = torch.isfinite(x).all()
        if record:
            ok = ok & torch.stack([torch.isfinite(lp).all() for lp in logps]).all()
        if finite is not None:
            finite.append(ok)
        else:
            check_finite([ok])
        if not record:
            return x, None
        return x, {"x": torch.stack(xs), "logp": torch.stack(logps)}

    def sample_chains(self, z: torch.Tensor, z_uncond: torch.Tensor | None, guidance: float | torch.Tensor,
                      temperature: float, generator: torch.Generator | None, k: int,
                      finite: list[torch.Tensor] | None = None) -> torch.Tensor:
        """K independent recorded chains for the same N tokens' z: their states [K, T+1, N, C].

        They run as one chain of states [K, N, C]: the network broadcasts the chain axis over the N z, so
        its conditioning (time and z embeddings, AdaLN modulations) is computed once per token for all K chains
        (faster than K chains one by one: docs/findings/2026-12-02-scale.md). The noise is drawn first, chain by
        chain in the order of K sequential calls of `sample_chain` (init, then each stochastic step), so chain k sees
        exactly the draws it would see alone: the two differ only in matmul rounding.
        """
        shape = (z.shape[0], self.token_dim)
        draws = [[self.init_noise(shape, generator, z.device)]
                 + [torch.randn(shape, generator=generator, device=z.device, dtype=torch.float32)
                    for j in range(self.num_steps) if self.is_stochastic(j)] for _ in range(k)]
        it = iter(range(len(draws[0])))

        def noise() -> torch.Tensor:  # the K chains' s-th draws, [K, N, C]
            s = next(it)
            return torch.stack([d[s] for d in draws])

        traj = self.sample_chain(z, z_uncond, guidance, temperature, generator, True, noise, finite)[1]
        return traj["x"].transpose(0, 1)


def check_finite(flags: list[torch.Tensor]) -> None:
    """Raise if any of the chains' all-finite flags is false (one host read for all of them)."""
    if flags and not bool(torch.stack(flags).all()):
        raise FloatingPointError("the diffusion head produced non-finite values (tokens or log-probabilities); "
                                 "the model weights or the sampling settings are broken")


def split_noise(committed: torch.Tensor, token_dim: int, main: torch.Generator | None,
                extra: torch.Generator | None, n_commit: int | None = None) -> Callable[[], torch.Tensor]:
    """Standard-normal draws [N, C] where committed tokens use `main` and the others `extra`.

    The committed tokens then see exactly the noise they would see if only they were diffused, so the
    images do not depend on which AR steps diffuse (and record) all unknown tokens. `n_commit` (the number of
    committed tokens, known to the sampler's schedule) saves a host read; the rows are placed through a stable
    sort instead of boolean masks (the same rows in the same order, without a sync).
    """
    if n_commit is None:
        n_commit = int(committed.sum())
    n_other = committed.numel() - n_commit
    dev = committed.device
    perm = torch.argsort((~committed).to(torch.int8), stable=True)  # committed rows first, each part ascending
    rows_c, rows_o = perm[:n_commit], perm[n_commit:]

    def draw() -> torch.Tensor:
        out = torch.empty(committed.numel(), token_dim, device=dev)
        out[rows_c] = torch.randn(n_commit, token_dim, generator=main, device=dev)
        out[rows_o] = torch.randn(n_other, token_dim, generator=extra, device=dev)
        return out

    return draw
