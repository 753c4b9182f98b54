"""Per-step metrics: ``metrics.jsonl`` (the record of truth) mirrored to TensorBoard.

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": N, "key": value, ...}``, each
line flushed as soon as it is written so a crash loses at most the line being written. Values
must be finite numbers: a nan reward or loss is a bug to surface at once, not a gap in a plot.

Resuming from the checkpoint of step N re-runs steps N+1... . ``MetricsWriter(run_dir,
resume_step=N)`` therefore first drops every line with step > N (and a torn last line), and asks
TensorBoard to purge its events after N, so a crash + resume yields the same ``metrics.jsonl`` as
an uninterrupted run. The writer adds no wall-clock fields for the same reason; log durations from
:class:`StepTimer` as ordinary metrics if you want them.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from margrpo.utils.atomic import atomic_write_text

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "StepTimer", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"
_TB_WARNED = False


def _metrics_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / METRICS_FILE if p.is_dir() else p


def _parse_lines(path: Path, text: str) -> list[dict[str, Any]]:
    """Parse JSONL text; a torn (unterminated, unparsable) final line is dropped with a warning."""
    rows: list[dict[str, Any]] = []
    lines = text.split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            if i == last and not text.endswith("\n"):
                warnings.warn(f"{path}:{i + 1}: dropping a torn last line (crash mid-write)", stacklevel=3)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` (or of ``<run_dir>/metrics.jsonl``), in file order."""
    p = _metrics_path(path)
    return _parse_lines(p, p.read_text(encoding="utf-8"))


def truncate_metrics(path: str | os.PathLike, max_step: int) -> int:
    """Atomically keep only rows with ``step <= max_step`` (and no torn line). Returns rows kept."""
    p = _metrics_path(path)
    if not p.exists():
        return 0
    rows = [r for r in _parse_lines(p, p.read_text(encoding="utf-8")) if r["step"] <= max_step]
    atomic_write_text(p, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    return len(rows)


def _to_number(key: str, value: Any, step: int) -> int | float:
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch.Tensor, without importing torch
        if value.numel() != 1:
            raise TypeError(f"metric '{key}' at step {step} is a tensor of {value.numel()} elements, not one")
        value = value.item()
    elif hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "shape", None) in ((), (1,)):
        value = value.item()  # numpy scalar / 0-d or 1-element array
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        x = float(value)
        if not math.isfinite(x):
            raise ValueError(f"metric '{key}' at step {step} is {x}; metrics must be finite numbers")
        return x
    raise TypeError(f"metric '{key}' at step {step} has type {type(value).__name__}; metrics must be numbers")


class MetricsWriter:
    """Append-only per-step metrics for a run directory, mirrored to TensorBoard.

    - ``resume_step=None``: a new run; refuses to touch a non-empty ``metrics.jsonl`` unless
      ``overwrite=True`` (so a forgotten ``--resume`` cannot erase a run's history).
    - ``resume_step=N``: keep rows with step <= N, drop the rest, append from there.

    TensorBoard events go into ``run_dir`` itself (so ``tensorboard --logdir runs/`` lists runs).
    If ``tensorboard`` is not installed, a warning is given once and only the JSONL is written.
    ``mirrors`` receive every written row too (W&B: :class:`margrpo.utils.wandb_log.WandbMirror`).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        tensorboard: bool = True,
        resume_step: int | None = None,
        overwrite: bool = False,
        mirrors: list[Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._last_step: int | None = None
        if resume_step is None:
            if self.path.exists() and self.path.stat().st_size > 0 and not overwrite:
                raise FileExistsError(
                    f"{self.path} already holds metrics; pass resume_step=N to continue that run, "
                    "overwrite=True to start over, or use a new run directory"
                )
            self.path.write_text("", encoding="utf-8")
        else:
            truncate_metrics(self.path, resume_step)
            rows = read_metrics(self.path) if self.path.exists() else []
            self._last_step = rows[-1]["step"] if rows else None
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb_enabled = tensorboard
        self._tb: Any = None
        self._purge_step = None if resume_step is None else resume_step + 1
        # further views of each written row (`log(row)`, `close()`), e.g. `margrpo.utils.wandb_log.WandbMirror`
        self.mirrors = list(mirrors or [])

    def _tb_writer(self) -> Any:
        global _TB_WARNED
        if self._tb is None and self._tb_enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                if not _TB_WARNED:
                    warnings.warn(f"TensorBoard logging disabled ({e}); metrics go to metrics.jsonl only",
                                  stacklevel=3)
                    _TB_WARNED = True
                self._tb_enabled = False
                return None
            self._tb = SummaryWriter(log_dir=str(self.run_dir), purge_step=self._purge_step, flush_secs=30)
        return self._tb

    def log(self, step: int, metrics: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Write one row ``{"step": step, **metrics, **kwargs}``. Returns the row as written.

        Raises ``ValueError`` naming the key for nan/inf values, ``TypeError`` for non-numbers, and
        ``ValueError`` if ``step`` goes backwards.
        """
        if self._file.closed:
            raise ValueError(f"{self.path}: writer is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {step!r}")
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"step {step} < last logged step {self._last_step}: steps must not go backwards")
        row: dict[str, Any] = {"step": step}
        for key, value in {**(metrics or {}), **kwargs}.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"metric names must be non-empty strings, got {key!r}")
            if key == "step":
                raise ValueError("'step' is reserved; pass it as the first argument")
            row[key] = _to_number(key, value, step)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        self._last_step = step
        tb = self._tb_writer()
        if tb is not None:
            for key, value in row.items():
                if key != "step":
                    tb.add_scalar(key, value, step)
        for mirror in self.mirrors:
            mirror.log(row)
        return row

    def flush(self) -> None:
        """Push buffered TensorBoard events and fsync the JSONL (e.g. right after a checkpoint)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for mirror in self.mirrors:
            mirror.close()
        self.mirrors = []

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepTimer:
    """Accumulates wall time per named phase of a step (rollout, reward, update, ...).

    ``with timer("rollout"): ...`` adds to ``timer.totals["rollout"]``. ``summary()`` returns
    ``{"time/rollout": s, ..., "time/total": s}`` ready for :meth:`MetricsWriter.log` and resets.
    GPU work is asynchronous, so pass ``sync=torch.cuda.synchronize`` to time what the device did;
    nested phases are counted in both phases and in the total.
    """

    def __init__(self, sync: Callable[[], Any] | None = None) -> None:
        self.sync = sync
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
            self.counts[name] = self.counts.get(name, 0) + 1

    __call__ = phase

    def summary(self, prefix: str = "time/", reset: bool = True) -> dict[str, float]:
        out = {f"{prefix}{k}": v for k, v in self.totals.items()}
        out[f"{prefix}total"] = sum(self.totals.values())
        if reset:
            self.reset()
        return out

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
