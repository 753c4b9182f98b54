"""Group-relative advantages (GRPO), with invalid samples and tied groups handled explicitly.

A = (r - mean_G) / (std_G + eps) inside each prompt's group. Options: `std="group"` (GRPO),
`std="batch"` (one std over the whole batch, Flow-GRPO's `global_std`), `std="none"` (mean-centred
only). Invalid samples (failed or non-finite rewards) are left out of their group's statistics and get
advantage 0. A group whose valid rewards all tie carries no signal: it is counted and its samples are
marked so the loss can skip them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_MODES = ("group", "batch", "none")


@dataclass
class Advantages:
    values: torch.Tensor  # [N] float32, 0 for invalid or tied samples
    use: torch.Tensor  # [N] bool: valid and in a group with signal
    num_groups: int
    tied_groups: int
    invalid: int

    @property
    def zero_signal_fraction(self) -> float:
        return self.tied_groups / max(1, self.num_groups)

def group_advantages(rewards: torch.Tensor, group: torch.Tensor, valid: torch.Tensor | None = None,
                     std: str = "group", eps: float = 1e-4, unbiased: bool = True,
                     tie_tol: float = 1e-6) -> Advantages:
    """Advantages for rewards [N] with group ids [N] (images of one prompt share an id).

    `unbiased` uses Bessel's correction for the std (torch's default, as the reference code does). A
    group with fewer than two valid samples is treated as tied (no baseline exists).
    """
    if std not in STD_MODES:
        raise ValueError(f"std={std!r}; valid: {STD_MODES}")
    rewards = rewards.detach().float().cpu()
    group = group.cpu()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.cpu().bool()
    if bool((valid & ~torch.isfinite(rewards)).any()):
        raise ValueError("a reward marked valid is not finite; mark it invalid instead")
    values = torch.zeros_like(rewards)
    use = torch.zeros_like(valid)
    ids = torch.unique(group)
    tied = 0
    centred = torch.zeros_like(rewards)
    for g in ids.tolist():
        idx = ((group == g) & valid).nonzero().flatten()
        r = rewards[idx]
        if len(idx) < 2 or float(r.max() - r.min()) <= tie_tol:
            tied += 1
            continue
        centred[idx] = r - r.mean()
        use[idx] = True
        if std == "group":
            values[idx] = (r - r.mean()) / (r.std(unbiased=unbiased) + eps)
    if std == "batch":
        ok = valid.clone()
        s = rewards[ok].std(unbiased=unbiased) if int(ok.sum()) > 1 else torch.tensor(0.0)
        values = torch.where(use, centred / (s + eps), torch.zeros_like(values))
    elif std == "none":
        values = torch.where(use, centred, torch.zeros_like(values))
    return Advantages(values=values, use=use, num_groups=len(ids), tied_groups=tied,
                      invalid=int((~valid).sum()))
