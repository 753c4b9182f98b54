"""Recompute conditions and head log-probabilities from a Rollout, exactly as the sampler computed them.

The trainer calls these with gradients on (policy) and off (reference). They reuse the sampler's own
`compute_conditions` and `head_transition`, with the same batch layout, so that before any update the
recomputed log-probabilities equal the recorded ones (the PPO ratio is exactly 1).

`score_guidance="rollout"` scores transitions under the guided prediction the sampler used;
`score_guidance="cond_only"` scores them under the conditional branch alone, as the MAR-GRPO reference code
does (a different density from the one that sampled, see reference-algorithm.md section 12.3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from margrpo.models.base import Policy
from margrpo.models.heads import DiffusionHead
from margrpo.sampling.chains import transition_log_probs
from margrpo.sampling.rollout import Rollout
from margrpo.sampling.sampler import SCORE_GUIDANCE_MODES, compute_conditions


@dataclass
class StepConditions:
    """Recomputed conditions of one AR step, restricted to its diffused tokens ([N, D])."""

    z: torch.Tensor
    z_uncond: torch.Tensor | None
    guidance: float
    z_full: torch.Tensor  # [B, L, D]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off as at sampling, whatever mode the trainer keeps the model in; gradients still flow."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def step_conditions(policy: Policy, rollout: Rollout, step: int, score_guidance: str = "rollout") -> StepConditions:
    """z for AR step `step` from its recorded canvas and known set, in eval mode as at sampling."""
    return batched_step_conditions(policy, rollout, [step], score_guidance)[step]


def batched_step_conditions(policy: Policy, rollout: Rollout, steps: Sequence[int],
                            score_guidance: str = "rollout") -> dict[int, StepConditions]:
    """z of several AR steps in one transformer call (their canvases stacked; rows with different known counts are
    padded by the policy), so that one forward and one backward serve every scored step."""
    if score_guidance not in SCORE_GUIDANCE_MODES:
        raise ValueError(f"score_guidance={score_guidance!r}; valid: {SCORE_GUIDANCE_MODES}")
    missing = [i for i in steps if i not in rollout.steps]
    if missing:
        raise KeyError(f"AR steps {missing} were not recorded; recorded steps: {sorted(rollout.steps)}")
    recs = [rollout.steps[i] for i in steps]
    guided = rollout.guidance_scale != 1.0 and score_guidance == "rollout"
    cond = rollout.cond
    if cond is not None and len(recs) > 1:
        cond = type(cond).cat([cond] * len(recs))
    with eval_mode(policy):
        z_c, z_u = compute_conditions(policy, torch.cat([r.canvas for r in recs]), torch.cat([r.mask for r in recs]),
                                      cond, guided)
    out = {}
    b = rollout.batch_size
    for k, (i, rec) in enumerate(zip(steps, recs, strict=True)):
        zc = z_c[k * b:(k + 1) * b]
        zu = z_u[k * b:(k + 1) * b] if z_u is not None else None
        sel = rec.diffused
        out[i] = StepConditions(z=zc[sel], z_uncond=zu[sel] if zu is not None else None,
                                guidance=rec.guidance if guided else 1.0, z_full=zc)
    return out


@dataclass
class ScoredTransitions:
    """Per-element mean/std/log-prob of recorded transitions at head steps `js`: each [J, N, C] float32."""

    js: list[int]
    mean: torch.Tensor
    std: torch.Tensor
    logp: torch.Tensor


def score_transitions(head: DiffusionHead, x: torch.Tensor, js: Sequence[int], cond: StepConditions,
                      temperature: float, tokens: torch.Tensor | None = None) -> ScoredTransitions:
    """Log-probability of x[j] -> x[j+1] for each j in `js` under `cond`, with the sampler's own code.

    `x` is a trajectory stack [T+1, N, C] (or [T+1, n, C] when `tokens`, an index tensor, restricts the
    conditions to n of the N tokens); the result is [J, N or n, C]. Axes between the first and the token axis
    (K chains of the same tokens: [T+1, K, n, C]) broadcast over the conditions and are kept in the result.
    """
    z, zu = cond.z, cond.z_uncond
    if tokens is not None:
        z = z[tokens]
        zu = zu[tokens] if zu is not None else None
    mean, std, logp = transition_log_probs(head, x, js, z, zu, cond.guidance, temperature)
    return ScoredTransitions(js=list(js), mean=mean, std=std, logp=logp)


def check_head_steps(policy: Policy, rollout: Rollout) -> None:
    if policy.head.num_steps != rollout.head_steps:
        raise ValueError(f"the head samples {policy.head.num_steps} steps but the rollout recorded "
                         f"{rollout.head_steps}; call head.set_sampling_steps({rollout.head_steps})")
