"""Evaluation inside the training loop: verifier accuracy with paired standard errors, and an EMA of the weights.

Every `eval.every` steps (and at step 0 and the end) the policy samples the same held-out prompts with the same
seeds (and, with `eval.in_distribution`, training prompts with fresh seeds), so each evaluation is paired with
step 0's; the sets are those of `margrpo eval`, the demo and compare for the same `eval.seed`. Per-image results go
to `eval/step-N.json` in the run directory: step 0's is read back on resume, so a resumed run reports the same
paired changes as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from margrpo.rl.config import TrainConfig
from margrpo.rl.monitors import DriftMonitor
from margrpo.utils.atomic import atomic_write_text


class ParameterEMA:
    """Exponential moving average of the trained parameters, updated after each optimizer step.

    `swapped()` puts the average into the model for the duration of a block (evaluation) and restores the
    trained weights after it, bit for bit.
    """

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in params}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params:
            self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        saved = {n: p.detach().clone() for n, p in self.params}
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params:
                    p.copy_(saved[n])


class TrainingEvaluator:
    """Held-out (and in-distribution) verifier accuracy of a training run, paired with step 0."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, monitor: DriftMonitor | None = None):
        from margrpo.worlds.shapes.evaluate import eval_sets

        if cfg.prompts.source != "shapes" or cfg.prompts.fixed:
            raise ValueError("eval.every > 0 scores the shapes world's held-out prompts with its verifier; it needs "
                             f"prompts.source='shapes' without prompts.fixed (got source={cfg.prompts.source!r})")
        self.cfg = cfg
        self.dir = out_dir / "eval"
        self.monitor = monitor  # measures the policy's held-out images (not the EMA's) against step 0's
        # the evaluation sets of `margrpo eval`, the demo and compare (worlds/shapes/evaluate.py): same prompts, seeds
        self.splits = eval_sets(cfg.eval.per_category, cfg.eval.seed,
                                ("heldout", "train") if cfg.eval.in_distribution else ("heldout",))

    def _file(self, step: int, tag: str) -> Path:
        return self.dir / f"step-{step}{tag}.json"

    def evaluate(self, model, step: int, tag: str = "") -> dict[str, float]:
        """Score `model` on every split; metrics `eval{tag}/{split}/strict` and, after step 0, the paired change."""
        from margrpo.worlds.shapes.evaluate import EvalResult, evaluate_set, paired_strict_change, strict_accuracy

        sampler = self.cfg.sampling
        record: dict[str, dict] = {}
        metrics: dict[str, float] = {}
        for split, eval_set in self.splits.items():
            res = evaluate_set(model, eval_set, sampler, progress=False)
            record[split] = {"prompts": res.prompts, "results": [
                {"strict": bool(r["strict"]), "partial": float(r["partial"]), "category": r["category"]}
                for r in res.results]}
            prefix = f"eval{tag}/{split}"
            for cat, v in res.summary.items():
                metrics[f"{prefix}/{cat}" if cat != "overall" else f"{prefix}/strict"] = v["strict"]
            metrics[f"{prefix}/strict_se"] = strict_accuracy(res)["overall"][1]  # clustered by prompt
            base_file = self._file(0, "")
            if step > 0 and base_file.is_file():
                base = json.loads(base_file.read_text())[split]
                before = EvalResult(prompts=base["prompts"], results=base["results"], summary={}, images=None,
                                    seconds=0.0)
                delta, se = paired_strict_change(before, res)["overall"]
                metrics[f"{prefix}/strict_change"] = delta
                metrics[f"{prefix}/strict_change_se"] = se
            if self.monitor is not None and not tag and split == "heldout":
                metrics.update(self.monitor.observe(step, res.images, res.prompts))
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._file(step, tag), json.dumps(record))
        return metrics
