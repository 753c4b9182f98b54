"""How a training run stops: a numerical fault in one step, too many in a row, drift beyond the reward-hacking
monitors' bounds, or a signal (docs/failures.md)."""

from __future__ import annotations

import math
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from margrpo.rl import distributed as D

if TYPE_CHECKING:
    from margrpo.rl.config import FaultSection


class StepFault(Exception):
    """A numerical fault inside one training step: what went wrong, where, and the offending value."""

    def __init__(self, what: str, where: str, value: float):
        self.what, self.where, self.value = what, where, value
        super().__init__(f"{what} ({value:.4g}) at {where}")

    def __reduce__(self):  # picklable, so that it crosses a process pool (margrpo compare's workers)
        return type(self), (self.what, self.where, self.value)


def loss_fault(loss: torch.Tensor, stats: dict[str, float], where: str, bounds: FaultSection) -> StepFault | None:
    """A non-finite loss, or a KL or PPO log-ratio beyond `faults.max_kl` / `faults.max_log_ratio`; else None."""
    if not torch.isfinite(loss):
        return StepFault("non-finite loss", where, float(loss.detach()))
    if bounds.max_kl is not None and stats.get("loss/kl", 0.0) > bounds.max_kl:
        return StepFault(f"KL to the reference above faults.max_kl={bounds.max_kl}", where, stats["loss/kl"])
    if bounds.max_log_ratio is not None:
        keys = ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min")  # MTE chains carry their own ratios
        log_ratio = max(abs(math.log(max(stats.get(k, 1.0), 1e-30))) for k in keys)
        if log_ratio > bounds.max_log_ratio:
            return StepFault(f"PPO log-ratio above faults.max_log_ratio={bounds.max_log_ratio}", where, log_ratio)
    return None


def raise_on_any_rank(fault: StepFault | None, where: str) -> None:
    """Raise `fault`, or, when another rank found one, a fault saying so: a step is skipped on every rank or on
    none (one rank skipping alone would leave the others waiting in its collectives)."""
    if D.all_reduce_sum([fault is not None])[0] > 0 and fault is None:  # every rank calls the collective
        raise StepFault("a fault on another rank", where, float("nan"))
    if fault is not None:
        raise fault


MAX_BAD_STEPS = 3  # bad steps in a row that stop a run (with a checkpoint of the last good weights)


class TrainingFault(RuntimeError):
    """Too many bad steps in a row: the run stopped; its checkpoint holds the last good weights."""


class DriftStop(TrainingFault):
    """`monitors.stop`: an evaluation drifted beyond the monitors' bounds; `--resume` continues from the checkpoint
    of the last evaluation within them (`margrpo.rl.monitors`)."""


class TrainingStopped(Exception):
    """SIGINT or SIGTERM stopped a run after a step; its checkpoint is written and `--resume` continues it."""

    def __init__(self, step: int, signum: int, out: Path):
        self.step, self.signum, self.out = step, signum, out
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written; "
                         f"continue with: margrpo train --resume {out}")

    def __reduce__(self):  # picklable, so that it crosses a process pool (margrpo compare's workers)
        return type(self), (self.step, self.signum, self.out)


class StopRequest:
    """Within its block, SIGINT and SIGTERM ask the training loop to stop after the current step.

    Why: a signal in the middle of an update would lose the step (or, in a checkpoint write, leave it to the
    atomic rename); finishing the step and checkpointing loses nothing. A second signal interrupts at once.
    Only the main thread can install handlers; elsewhere the block changes nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
