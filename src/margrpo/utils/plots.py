"""Training-curve figures: ``report.png`` for one run, and method comparisons over seeds.

Figures are drawn with ``matplotlib.figure.Figure`` and its Agg canvas directly, never through
``pyplot``: pyplot keeps global state (current figure, backend) that leaks memory in long runs, is
not thread-safe, and would try to open a window on a desktop. Files are written atomically.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from margrpo.utils.atomic import atomic_write

__all__ = ["plot_report", "plot_comparison", "smooth_ema", "metric_series"]

SPARSE_POINTS = 30  # fewer points than this: drawn unsmoothed, with markers


def smooth_ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average (``weight`` in [0, 1); 0 = none)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    v = np.asarray(values, dtype=np.float64)
    if weight == 0.0 or v.size == 0:
        return v.copy()
    out = np.empty_like(v)
    acc = 0.0
    for i, x in enumerate(v):
        acc = weight * acc + (1.0 - weight) * x
        out[i] = acc / (1.0 - weight ** (i + 1))
    return out


def metric_series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a finite number under ``key`` (row index if no 'step')."""
    steps, values = [], []
    for i, row in enumerate(metrics):
        v = row.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        steps.append(row.get("step", i))
        values.append(float(v))
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _expand(metrics: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    """A key, or all keys matching a glob such as ``reward/*`` (sorted)."""
    if not any(ch in key for ch in "*?["):
        return [key]
    names = {k for row in metrics for k in row if k != "step"}
    return sorted(k for k in names if fnmatch.fnmatchcase(k, key))


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi), binary=True)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.4")


def plot_report(
    metrics: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    path: str | os.PathLike,
    title: str | None = None,
    smoothing: float = 0.0,
    ncols: int = 3,
    dpi: int = 100,
    guides: Mapping[str, Sequence[float]] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """One panel per key of ``metrics`` (rows from ``metrics.jsonl``) against step.

    A key may be a glob (``"reward/*"``) to draw several curves in one panel. With ``smoothing`` > 0
    the raw curve is drawn faintly under its EMA, except a sparse one (under ``SPARSE_POINTS`` points, such as
    the in-loop evaluations every few hundred steps), drawn as measured with markers: an EMA over a handful of
    points would mostly show its own lag. A key with no data gets a panel saying so, so
    that a missing metric is visible instead of silently absent. ``guides`` maps a key to values
    marked by dashed horizontal lines in its panel (bounds); ``notes`` are lines of text printed
    in red under the title (warnings). Returns the written path.
    """
    if not keys:
        raise ValueError("plot_report: no keys to plot")
    ncols = max(1, min(ncols, len(keys)))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for idx, key in enumerate(keys):
        ax = axes[idx // ncols][idx % ncols]
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        names = _expand(metrics, key)
        drawn = 0
        for name in names:
            x, y = metric_series(metrics, name)
            if x.size == 0:
                continue
            label = name if len(names) > 1 else None
            if smoothing > 0 and x.size >= SPARSE_POINTS:
                (line,) = ax.plot(x, y, alpha=0.25, linewidth=0.8)
                ax.plot(x, smooth_ema(y, smoothing), color=line.get_color(), linewidth=1.5, label=label)
            else:
                ax.plot(x, y, linewidth=1.2, marker="." if x.size < SPARSE_POINTS else None, label=label)
            drawn += 1
        for y in (guides or {}).get(key, ()):
            ax.axhline(y, color="0.3", linestyle="--", linewidth=0.8)
        if drawn == 0:
            _note(ax, f"no data for '{key}'")
            ax.set_xticks([])
            ax.set_yticks([])
        elif len(names) > 1:
            ax.legend(fontsize=7)
    for idx in range(len(keys), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    if title or notes:
        lines = [title] if title else []
        fig.suptitle("\n".join(lines + list(notes)), color="firebrick" if notes else "black",
                     fontsize=10 if notes else None)
    return _save(fig, path, dpi)


def plot_comparison(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    key: str,
    path: str | os.PathLike,
    title: str | None = None,
    smoothing: float = 0.0,
    dpi: int = 100,
) -> Path:
    """Mean +- std over seeds of ``key`` vs step, one curve per method.

    ``runs[method]`` is a list of seeds, each a list of metric rows. Seeds are smoothed first,
    then aggregated at each step over the seeds that logged it (the label shows the seed count).
    Methods without data for ``key`` are listed in the legend as such. Returns the written path.
    """
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    missing = []
    for method, seeds in runs.items():
        per_step: dict[float, list[float]] = {}
        for rows in seeds:
            x, y = metric_series(rows, key)
            if x.size == 0:
                continue
            if smoothing > 0:
                y = smooth_ema(y, smoothing)
            for s, v in zip(x, y, strict=True):
                per_step.setdefault(float(s), []).append(float(v))
        if not per_step:
            missing.append(method)
            continue
        steps = np.array(sorted(per_step))
        mean = np.array([np.mean(per_step[s]) for s in steps])
        std = np.array([np.std(per_step[s]) for s in steps])
        n = max(len(v) for v in per_step.values())
        (line,) = ax.plot(steps, mean, linewidth=1.5, label=f"{method} (n={n})")
        if n > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    for method in missing:
        ax.plot([], [], linestyle="none", label=f"{method}: no data for '{key}'")
    if not runs or len(missing) == len(runs):
        _note(ax, f"no data for '{key}'")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    if runs:
        ax.legend(fontsize=8)
    ax.set_title(title or f"{key} (mean ± std over seeds)")
    return _save(fig, path, dpi)
