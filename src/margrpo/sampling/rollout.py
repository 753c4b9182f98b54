"""The Rollout record: everything the trainer needs to recompute the policy's log-probabilities exactly.

Per recorded AR step i it keeps the canvas before the step, which positions were known, which were
committed, which ran through the head ("diffused": the committed ones, or every unknown one when the
sampler diffuses all unknown tokens, which the consistency mask needs), the guidance scale, the head
trajectory of every diffused token and its log-probabilities, and, with MTE, the extra chains of the
uncertain tokens with their log-probabilities. Trajectories are packed: the N diffused tokens of a step are
taken in row-major (image, position) order of the `diffused` mask, so `z[diffused]` lines up with `x[:, n]`.
Only what replay reads is stored (as Flow-GRPO's rollouts): no means or stds, and z only on request.

Shapes (B images, L tokens, C token channels, D width of z, T head steps, N diffused tokens, K MTE chains,
n uncertain tokens, J recorded MTE head steps):

    known, to_pred, diffused   [B, L] bool
    canvas                     [B, L, C]
    z, z_uncond                [B, L, D]       (record_z only; z_uncond only with guidance)
    x                          [T + 1, N, C]   x[j] is the input of head step j, x[j+1] its output
    logp                       [T, N, C]       float32 log N(x[j+1]; mean_j, std_j^2) under the sampling density
    logp_cond                  [T, N, C]       the same under the conditional branch alone (guided rollouts
                                               scored "cond_only")
    mte_tokens                 [n]             indices into the N diffused tokens
    mte_x                      [K, T + 1, n, C]
    mte_logp                   [K, J, n, C]    at head steps `mte_head_steps`, under the scoring z
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from margrpo.models.conditioning import Condition


@dataclass
class ARStepRecord:
    ar_step: int
    known: torch.Tensor
    to_pred: torch.Tensor
    diffused: torch.Tensor
    canvas: torch.Tensor
    guidance: float
    x: torch.Tensor
    logp: torch.Tensor
    logp_cond: torch.Tensor | None = None
    z: torch.Tensor | None = None
    z_uncond: torch.Tensor | None = None
    mte_tokens: torch.Tensor | None = None
    mte_head_steps: list[int] | None = None
    mte_x: torch.Tensor | None = None
    mte_logp: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        """MAR's mask convention for this step's input: 1 = still unknown."""
        return (~self.known).float()

    def committed_in_diffused(self) -> torch.Tensor:
        """[N] bool: which packed trajectories were written to the canvas at this step."""
        return self.to_pred[self.diffused]

    def final_values(self) -> torch.Tensor:
        """[B, L, C] head output of this step at the diffused positions (zeros elsewhere)."""
        out = torch.zeros(*self.diffused.shape, self.x.shape[-1], dtype=self.x.dtype, device=self.x.device)
        out[self.diffused] = self.x[-1]
        return out


@dataclass
class Rollout:
    """A batch of generations with the record needed for exact log-probability recomputation."""

    cond: Condition | None
    orders: torch.Tensor  # [B, L]
    counts: list[int]  # tokens committed per AR step
    tokens: torch.Tensor  # final tokens [B, L, C]
    steps: dict[int, ARStepRecord]
    head_steps: int
    guidance_scale: float
    guidance_schedule: str
    temperature: float
    policy_tokens: str  # which tokens the recorded steps diffused: "committed" or every "unknown" one
    prompts: list[str] = field(default_factory=list)
    group: torch.Tensor | None = None  # [B] prompt index of each image
    mte_source: str | None = None  # where the MTE chains came from: "commit", "scored", "bridge" (None: no MTE)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_ar_steps(self) -> int:
        return len(self.counts)

    @property
    def mte_k(self) -> int:
        for rec in self.steps.values():
            if rec.mte_x is not None:
                return int(rec.mte_x.shape[0])
        return 0

    def committed_step(self) -> torch.Tensor:
        """[B, L] the AR step at which each token was written.

        LTH14 keeps the first `mask_len` positions of the order masked, so step 0 commits the last
        `counts[0]` positions of the order, step 1 the ones before them, and so on.
        """
        out = torch.empty_like(self.orders)
        end = self.orders.shape[1]
        for i, n in enumerate(self.counts):
            out.scatter_(1, self.orders[:, end - n:end], i)
            end -= n
        return out

    def nbytes(self) -> int:
        total = 0
        for rec in self.steps.values():
            for t in (rec.x, rec.logp, rec.logp_cond, rec.z, rec.z_uncond, rec.canvas, rec.mte_x, rec.mte_logp):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total
