"""How a training run stops: a numerical fault in one step, too many in a row, drift beyond the reward-hacking
monitors' bounds, or a signal (docs/failures.md)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


class StepFault(Exception):
    """A numerical fault inside one training step: what went wrong, where, and the offending value."""

    def __init__(self, what: str, where: str, value: float):
        self.what, self.where, self.value = what, where, value
        super().__init__(f"{what} ({value:.4g}) at {where}")

    def __reduce__(self):  # picklable, so that it crosses a process pool (margrpo compare's workers)
        return type(self), (self.what, self.where, self.value)


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
