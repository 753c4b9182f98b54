"""Head chains: a token's whole chain of head steps, its recorded states and log-probabilities.

Shared by the sampler and the MTE chains (`mte.py`). A transition's log-probability has one definition,
`DiffusionHead.score_transitions`, which the loss recomputes with. Every call of the head goes through the head
module (`head(...)`), so DDP and FSDP2 hooks fire.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from margrpo.models.heads import DiffusionHead, Transition, gaussian_log_prob


def head_transition(head: DiffusionHead, x: torch.Tensor, j: int, z: torch.Tensor, z_uncond: torch.Tensor | None,
                    guidance: float, temperature: float) -> Transition:
    """One head step, guided when an unconditional condition is given (through the head module's call)."""
    return head(x, j, z, z_uncond, guidance if z_uncond is not None else 1.0, temperature)


def run_chain(head: DiffusionHead, z: torch.Tensor, z_uncond: torch.Tensor | None, guidance: float | torch.Tensor,
              temperature: float, generator: torch.Generator | None, record: bool,
              noise_fn: Callable[[], torch.Tensor] | None = None, finite: list[torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Full head chain for N tokens. Returns the final x [N, C] and, if `record`, the x and logp stacks.

    `noise_fn()` (if given) supplies each standard-normal draw [N, C] instead of `generator`, or [K, N, C] for K
    chains of the same N tokens (the head broadcasts the chain axis over z). With `finite` (a
    list), the all-finite flag is appended as a tensor for the caller to check once (`check_finite`) instead of
    being read here: reading it is a device-to-host sync per call, i.e. per AR step.
    """
    t_steps = head.num_steps
    shape = (z.shape[0], head.token_dim)
    x = noise_fn() if noise_fn is not None else head.init_noise(shape, generator, z.device)
    xs, logps = [x], []
    for j in range(t_steps):
        tr = head_transition(head, x, j, z, z_uncond, guidance, temperature)
        eps = noise_fn() if (noise_fn is not None and head.is_stochastic(j)) else None
        x = head.sample_step(tr, j, generator, eps)
        if record:
            xs.append(x)
            if head.is_stochastic(j):
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


def run_chains(head: DiffusionHead, z: torch.Tensor, z_uncond: torch.Tensor | None,
               guidance: float | torch.Tensor, temperature: float, generator: torch.Generator | None, k: int,
               finite: list[torch.Tensor] | None = None) -> torch.Tensor:
    """K independent recorded chains for the same N conditions: their states [K, T+1, N, C].

    They run as one chain of states [K, N, C]: the head broadcasts the chain axis over the N conditions, so its
    conditioning (time and z embeddings, AdaLN modulations) is computed once per token for all K chains (measured
    1.36x faster than K chains one by one). The noise is drawn first, chain by chain in the order of K sequential
    calls of `run_chain` (init, then each stochastic step), so chain k sees exactly the draws it would see alone:
    the two differ only in matmul rounding.
    """
    shape = (z.shape[0], head.token_dim)
    draws = [[head.init_noise(shape, generator, z.device)]
             + [torch.randn(shape, generator=generator, device=z.device, dtype=torch.float32)
                for j in range(head.num_steps) if head.is_stochastic(j)] for _ in range(k)]
    it = iter(range(len(draws[0])))

    def noise_fn() -> torch.Tensor:  # the K chains' s-th draws, [K, N, C]
        s = next(it)
        return torch.stack([d[s] for d in draws])

    traj = run_chain(head, z, z_uncond, guidance, temperature, generator, True, noise_fn, finite)[1]
    return traj["x"].transpose(0, 1)
