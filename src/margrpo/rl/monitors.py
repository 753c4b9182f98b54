"""Reward-hacking monitors: each in-loop evaluation's images against step 0's (docs/failures.md, "Reward hacking").

Why: a hacked reward keeps rising while the images are ruined, and the curves a run logs do not show it: grid
artifacts within a few epochs (flow_grpo#233), images drifting brighter (DiffusionNFT#47), an OCR-only run that
erased the backgrounds (UniRL#407, colour entropy down 54%). So every evaluation also measures its images
(`margrpo.utils.image_stats`) and, where configured, held-out rewards the run does not train on (`monitors.watch`),
and compares each with step 0's: the same prompts and seeds, so the comparison is paired.

Drift of a monitored value = (mean now - mean at step 0) / the standard deviation of step 0's per-image values:
how far the average image moved, in units of how much step 0's images differ from each other. It has no units,
so one kind of bound serves brightness, entropy in bits, JPEG bits per pixel and rewards on any scale. An image
statistic is beyond its bound when |drift| exceeds it; a watched reward only when it falls by more (a rise of a
held-out reward is no hacking). The default bounds were set between the drift of normal training and that of a
hacked reward on the shapes world (docs/findings/2026-12-07-reward-hacking-monitors.md).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from margrpo.rl.config import DEFAULT_BOUNDS, WATCH_BOUND
from margrpo.utils.atomic import atomic_write_text
from margrpo.utils.image_stats import STATISTICS, image_statistics

__all__ = ["DEFAULT_BOUNDS", "WATCH_BOUND", "Drift", "DriftMonitor", "compare", "drift_table", "effective_bounds",
           "report_series", "token_period"]
UNITS = {"brightness": "", "saturation": "", "colour_entropy": " bits", "grid_energy": "", "jpeg_bpp": " bits/px"}


@dataclass(frozen=True)
class Drift:
    """One monitored value at one evaluation against step 0."""

    name: str
    before: float  # mean at step 0
    after: float  # mean now
    drift: float  # (after - before) / std of step 0's per-image values
    bound: float | None  # None: recorded, not checked
    watched: bool  # a held-out reward (only a fall counts) rather than an image statistic

    @property
    def beyond(self) -> bool:
        if self.bound is None:
            return False
        return (-self.drift if self.watched else abs(self.drift)) > self.bound

    def describe(self) -> str:
        unit = UNITS.get(self.name, "")
        relative = f", {self.after / self.before - 1:+.1%}" if self.before > 0 and not self.watched else ""
        bound = "no bound"
        if self.bound is not None:
            bound = f"bound {'a fall of ' if self.watched else '+-'}{self.bound:g}"
        return (f"{self.name} {self.before:.4g} -> {self.after:.4g}{unit}{relative}: drift {self.drift:+.2f} "
                f"standard deviations of step 0's images ({bound})")


def compare(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], bounds: Mapping[str, float | None],
            watched: Sequence[str] = ()) -> list[Drift]:
    """The drift of every value `before` and `after` both hold (name -> per-image values of the same images).

    Images without a value (nan: an invalid watched reward) at either step are left out of both means. The
    standard deviation is floored at 1e-6 + 1e-3 |mean| so that step-0 images which all agree divide by no zero.
    """
    out = []
    for name in before:
        if name not in after:
            continue
        b, a = np.asarray(before[name], dtype=np.float64), np.asarray(after[name], dtype=np.float64)
        if b.shape != a.shape:
            raise ValueError(f"monitors: {name} has {b.size} values at step 0 but {a.size} now: the evaluation set "
                             "changed (evaluate the same prompts throughout a run, or start a new run)")
        both = np.isfinite(b) & np.isfinite(a)
        if both.sum() < 2:
            continue
        mean_b, mean_a = float(b[both].mean()), float(a[both].mean())
        scale = max(float(b[both].std(ddof=1)), 1e-6 + 1e-3 * abs(mean_b))
        out.append(Drift(name, mean_b, mean_a, (mean_a - mean_b) / scale, bounds.get(name), name in watched))
    return out


def drift_table(drifts: Sequence[Drift]) -> str:
    """Markdown: value | before | after | change | drift | bound | beyond (the demo's before/after record)."""
    lines = ["| value | before | after | change | drift (sd) | bound | |", "|---|---:|---:|---:|---:|---:|---|"]
    for d in drifts:
        change = f"{d.after / d.before - 1:+.1%}" if d.before > 0 and not d.watched else ""
        bound = "" if d.bound is None else f"{'fall ' if d.watched else '±'}{d.bound:g}"
        lines.append(f"| {d.name} | {d.before:.4g} | {d.after:.4g} | {change} | {d.drift:+.2f} | {bound} | "
                     f"{'**beyond**' if d.beyond else ''} |")
    return "\n".join(lines)


def effective_bounds(bounds: Mapping[str, float | None], watched: Sequence[str]) -> dict[str, float | None]:
    """The measured defaults, `WATCH_BOUND` for each watched reward, then the configured `bounds` over them."""
    return {**DEFAULT_BOUNDS, **dict.fromkeys(watched, WATCH_BOUND), **bounds}


def token_period(model) -> int:
    """The side in pixels of the image area one token decodes to (the period of grid artifacts)."""
    side = math.isqrt(model.seq_len)
    if side * side != model.seq_len or model.image_size % side:
        raise ValueError(f"monitors: {model.seq_len} tokens for {model.image_size}-pixel images form no square grid "
                         "of whole pixels; the grid energy needs one")
    return model.image_size // side


class DriftMonitor:
    """Statistics and watched rewards of each evaluation's images, their drift from step 0, and the verdict.

    Per-image values go to `monitors-step-N.json` beside the evaluation's results; step 0's are read back from
    there, so a resumed run compares with the same step 0 as an uninterrupted one.
    """

    def __init__(self, bounds: Mapping[str, float | None], watch: Mapping[str, Mapping], directory: Path,
                 period: int, device: str | torch.device = "cpu"):
        """`bounds` and `watch` as `monitors.bounds` and `monitors.watch` give them; `period` is `token_period`."""
        self.dir = directory
        self.period = period
        self.watched = list(watch)
        self.bounds = effective_bounds(bounds, self.watched)
        self.rewards = None
        if self.watched:
            from margrpo.rewards import build_rewards

            self.rewards = build_rewards({label: {**opts, "weight": 1.0} for label, opts in watch.items()},
                                         device=device)
        self.drifts: list[Drift] = []  # of the last observation
        self.warned_missing_base = False

    def _file(self, step: int) -> Path:
        return self.dir / f"monitors-step-{step}.json"

    def measure(self, images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """name -> per-image values: every image statistic, then every watched reward (nan where invalid)."""
        values = image_statistics(images, self.period)
        if self.rewards is not None:
            out = self.rewards(images, prompts)
            for label in self.watched:
                values[label] = out.components[label].double().numpy()
        return values

    def observe(self, step: int, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Measure one evaluation's images; metrics `monitor/NAME` (the mean) and, after step 0, `monitor/NAME/drift`
        and `monitor/beyond` (how many values are beyond their bounds). Each one beyond warns on stderr."""
        values = self.measure(images, prompts)
        metrics = {f"monitor/{k}": float(np.nanmean(v)) for k, v in values.items() if np.isfinite(v).any()}
        self.drifts = []
        base = self._file(0)
        if step > 0 and not base.is_file():
            if not self.warned_missing_base:
                print(f"monitors: {base} is missing (a run begun before the monitors existed, or the file was "
                      "removed): the statistics are recorded without drift or bounds", file=sys.stderr)
                self.warned_missing_base = True
        elif step > 0:
            before = {k: np.array(v, dtype=np.float64) for k, v in json.loads(base.read_text())["values"].items()}
            self.drifts = compare(before, values, self.bounds, self.watched)
            for d in self.drifts:
                metrics[f"monitor/{d.name}/drift"] = d.drift
            metrics["monitor/beyond"] = float(sum(d.beyond for d in self.drifts))
            for d in self.beyond:
                print(f"monitors: step {step}: {d.describe()}; beyond its bound (docs/failures.md, "
                      "\"Reward hacking\")", file=sys.stderr)
        record = {"values": {k: [x if math.isfinite(x) else None for x in v.tolist()] for k, v in values.items()},
                  "beyond": [d.name for d in self.beyond]}
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._file(step), json.dumps(record))
        return metrics

    @property
    def beyond(self) -> list[Drift]:
        """The values of the last observation that are beyond their bounds."""
        return [d for d in self.drifts if d.beyond]


def report_series(metrics: Sequence[Mapping], bounds: Mapping[str, float | None]) -> tuple[list[dict], list[str]]:
    """For report.png: rows with each bounded drift as a share of its bound (`drift / bound/NAME`; beyond it past
    +-1; a watched reward's fall counts negative), and one note per value that went beyond, with its first step."""
    rows, notes = [], []
    first: dict[str, tuple[int, float]] = {}
    for r in metrics:
        row = {"step": r["step"]}
        for name, bound in bounds.items():
            drift = r.get(f"monitor/{name}/drift")
            if drift is None or not bound:
                continue
            row[f"drift / bound/{name}"] = drift / bound
            watched = name not in STATISTICS
            if (-drift if watched else abs(drift)) > bound and name not in first:
                first[name] = (r["step"], drift)
        if len(row) > 1:
            rows.append(row)
    for name, (step, drift) in first.items():
        notes.append(f"monitors: {name} beyond its bound {bounds[name]:g} from step {step} (drift {drift:+.2f} sd)")
    return rows, notes
