"""Which AR steps and head steps a training step scores, and which AR steps its rollout must record.

Head steps whose score is dominated by sampling noise are never scored (`scorable_head_steps`; the finding is in
docs/findings/2026-12-01-noise-dominated-head-steps.md). The choice is a pure function of (seed, rank, step).
"""

from __future__ import annotations

import torch

from margrpo.models.base import Policy
from margrpo.rl.config import TrainConfig
from margrpo.sampling.config import RecordPlan
from margrpo.utils.rng import make_generator


def scorable_head_steps(head, max_gain: float, guidance: float = 1.0, temperature: float = 1.0) -> list[int]:
    """Stochastic head steps whose score gain is at most `max_gain` (the others' score terms are noise).

    `guidance` is the largest guidance scale the scored density carries (the gain grows with it) and `temperature`
    the sampling temperature (the std shrinks with it)."""
    gains = {j: head.score_gain(j, guidance, temperature) for j in range(head.num_steps) if head.is_stochastic(j)}
    eligible = [j for j, g in gains.items() if g <= max_gain]
    if not eligible:
        raise ValueError(f"no head step has a score gain <= algorithm.head_step_max_gain={max_gain} at guidance "
                         f"{guidance:g} and temperature {temperature:g}; the gains of this head's stochastic steps "
                         f"are {', '.join(f'{g:.3g}' for g in gains.values()) or 'none (it has none)'}")
    return eligible


def scored_guidance(cfg: TrainConfig) -> float:
    """The largest guidance scale in the density the policy term scores (1 when only the conditional branch is)."""
    return cfg.sampling.guidance_scale if cfg.algorithm.score_guidance == "rollout" else 1.0


def select_steps(cfg: TrainConfig, policy: Policy, step: int, rank: int = 0
                 ) -> tuple[list[int], dict[int, list[int]], RecordPlan]:
    """AR steps to score, head steps per AR step, and what the rollout must record for them (the one place a
    `RecordPlan` is built from the `algorithm:` section).

    The AR steps are those of the policy's schedule for `sampling.ar_steps` (a family whose schedule drops empty
    steps, as NOVA's, has fewer)."""
    a = cfg.algorithm
    head = policy.head
    n_ar = len(policy.mask_schedule(cfg.sampling.ar_steps))
    g = make_generator(cfg.seed, "select", rank, step)
    count = min(max(1, round(a.ar_step_fraction * n_ar)), n_ar)
    ar = sorted(torch.randperm(n_ar, generator=g)[:count].tolist())
    if a.estimator == "trajectory":  # the policy term scores the recorded transitions: its gain is the sampler's
        eligible = scorable_head_steps(head, a.head_step_max_gain, scored_guidance(cfg), cfg.sampling.temperature)
    else:  # the head steps carry only the analytic KL, whose noise does not scale with guidance / temperature
        eligible = scorable_head_steps(head, a.head_step_max_gain)
    per = len(eligible) if a.head_steps_per_ar_step is None else min(a.head_steps_per_ar_step, len(eligible))
    head_steps = {i: sorted(eligible[k] for k in torch.randperm(len(eligible), generator=g)[:per].tolist())
                  for i in ar}
    record = set(ar)
    if a.policy_tokens == "consistent":  # the consistency mask compares with the previous step
        record |= {i - 1 for i in ar if i > a.consistency_start}
    plan = RecordPlan(steps=tuple(sorted(record)), policy_tokens=a.policy_tokens, mte_k=a.mte_k,
                      mte_source=a.mte_source, mte_top_fraction=a.mte_top_fraction,
                      head_steps={i: tuple(v) for i, v in head_steps.items()}, score_guidance=a.score_guidance)
    return ar, head_steps, plan
