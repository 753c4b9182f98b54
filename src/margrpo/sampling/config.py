"""What the sampler is told: how to sample (`SamplerConfig`, a training config's `sampling:` section too) and, for a
training rollout, what to record for the loss (`RecordPlan`).

A leaf: it imports nothing of the sampler's, so the sampler, the MTE chains, the training config and the loss all
read these two objects without importing each other. Every choice is declared here once; the training config
validates it when it loads a file (`option(..., choices=...)`), and the trainer builds the `RecordPlan` of each
rollout in one place (`rl.selection.select_steps`) from the validated `algorithm:` section.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from margrpo.utils.config import option

GUIDANCE_SCHEDULES = ("linear", "constant")
POLICY_TOKENS = ("committed", "unknown", "consistent")
MTE_SOURCES = ("commit", "scored", "bridge")
SCORE_GUIDANCE_MODES = ("rollout", "cond_only")


@dataclass
class SamplerConfig:
    """How rollouts and images are sampled (fewer AR and head steps and no CFG make rollouts cheap)."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"cfg": "guidance_scale", "cfg_schedule": "guidance_schedule"}
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "batch_mte_chains": "the K MTE chains always run together, one head call per step (faster, and the same "
                            "chains up to matmul rounding: docs/findings/2026-12-02-scale.md)",
        "compile": "rollouts run eager (torch.compile gives the same rollout and no measurement showed it faster)",
    }

    ar_steps: int = option(8, "AR steps per image (MAR's cosine mask schedule decides how many tokens each commits)",
                           range=(1, 4096))
    diffusion_steps: int | None = option(10, "head denoising steps per token (the head's schedule respaced to this; "
                                         "null = the head's own)", range=(1, 1000))
    guidance_scale: float = option(1.0, "classifier-free guidance scale of rollouts (1 = none: half the cost)",
                                   range=(1.0, 50.0))
    guidance_schedule: str | None = option(None, "guidance over AR steps: MAR's linear ramp from 1 to "
                                           "`guidance_scale`, or constant; null = the model family's (linear for "
                                           "MAR, constant for NOVA and Harmon, as upstream)",
                                           choices=GUIDANCE_SCHEDULES)
    temperature: float = option(1.0, "scale of the head's sampling std", range=(0.01, 10.0))

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0


@dataclass(frozen=True)
class RecordPlan:
    """What a training rollout records for the loss, and nothing more (as Flow-GRPO's rollouts).

    `steps`: the AR steps to record (None = all). `policy_tokens`: which tokens a recorded step runs through the head
    (those it commits, or every still-unknown one, which the policy term of `unknown` / `consistent` needs).
    `mte_k` > 0: per image, the `mte_top_fraction` most uncertain tokens of a recorded step keep their K extra
    chains (drawn under the committing step's z, or the scored one's, or bridges from the forward process to the
    token's committed value: `mte_source`) and the chains' log-probabilities at `head_steps[step]` (every stochastic
    head step where not given), under the step's scoring z, so the loss's ratio-is-1 check can fail.
    `score_guidance`: the density the loss scores transitions
    under (the guided one that sampled, or the conditional branch alone: the rollout then records its
    log-probabilities too). `record_z`: also keep each recorded step's z (tests compare replay with it).
    """

    steps: tuple[int, ...] | None = None
    policy_tokens: str = "committed"
    mte_k: int = 0
    mte_source: str = "commit"
    mte_top_fraction: float = 0.3
    head_steps: dict[int, tuple[int, ...]] | None = None
    score_guidance: str = "rollout"
    record_z: bool = False
