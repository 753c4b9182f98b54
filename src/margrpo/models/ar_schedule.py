"""The AR schedule shared by every model family: how many tokens each AR step commits (MAR's cosine mask schedule) and
the guidance scale of each AR step.

Pure functions of integers and floats, so that the sampler, the families and the tests all see one definition.
"""

from __future__ import annotations

import math


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
