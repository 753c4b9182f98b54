"""`margrpo compare`: the presets side by side with the same seeds and budget, plus null and positive controls.

For each method (a preset: grpo, mar-grpo, mar-grpo-matching, nft by default) and seed it trains from the same
base with the same config and scores the result on the held-out prompts and on training prompts with fresh seeds
(in-distribution), each change with its paired standard error against the base; and each main run again at its
best sampler setting against the base at its best (both chosen on training prompts, `experiments/baselines.py`).
It reports the final accuracies (mean and spread over seeds), the reward, KL and grad-norm curves, and seconds per
step.

Two controls per method. The positive control trains on an easy dense reward (share of red pixels, one fixed
prompt) for every seed; if that does not rise beyond its step-to-step noise, the estimator is broken and no other
figure counts. The null control trains (first seed, same budget) on a random reward that carries no information,
logging the real rewards beside it with weight 0: the held-out accuracy it ends at is what the optimizer's noise
alone does to the model, the floor a real reward must beat before any gain is credited to learning.

Runs are independent, so they go to `workers` processes (one thread each; one per core measured fastest on the
2-core CPU this was built on). Each run is deterministic from its seed, so the table does not depend on `workers`.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from margrpo.configs import config_path
from margrpo.experiments.baselines import base_at_best, selection_set, trained_at_best
from margrpo.experiments.results_doc import publish
from margrpo.models.loading import load_model
from margrpo.rl.config import TrainConfig
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config
from margrpo.utils.plots import plot_comparison
from margrpo.worlds.shapes.evaluate import EvalResult, eval_sets, evaluate_set, paired_strict_change
from margrpo.worlds.shapes.sampler_grid import GUIDANCES, TEMPERATURES, grid_settings

# The positive control: one prompt, one group of 64 images, every AR step and every scored head step, Adam 1e-4
# (scale-free, so every estimator gets the same step whatever the size of its loss), no ptx term, and
# temperature 1 whatever the compared settings (the setting of the measurements below, so that a control's
# figures compare across configs): it tests the estimator alone. Measured on the shipped base
# (docs/findings/2026-12-01-noise-dominated-head-steps.md): the red share rises 0.066 -> 0.197 in 15 grpo steps
# and 0.066 -> 0.178 with the paper's mar-grpo preset; scoring the noise-dominated head steps too
# (head_step_max_gain 1e4) leaves it at 0.077.
CONTROL = ["rewards={colour_fraction: 1.0}", "prompts.fixed=[a red square]", "algorithm.prompts_per_step=1",
           "algorithm.group_size=64", "algorithm.ar_step_fraction=1.0", "algorithm.head_steps_per_ar_step=8",
           "optim.name=adamw", "optim.lr=1e-4", "algorithm.ptx_weight=0", "eval.every=0", "sampling.temperature=1.0"]
METHODS = ("grpo", "mar-grpo", "mar-grpo-matching", "nft")
RESULTS_START, RESULTS_END = "<!-- compare-results:start -->", "<!-- compare-results:end -->"
PLOTS = ("reward/mean", "loss/kl", "grad_norm")


@dataclass(frozen=True)
class Job:
    """One training run of the comparison: a method, a seed and its kind ("main", "null" or "control")."""

    method: str
    seed: int
    kind: str
    config: str
    overrides: tuple[str, ...]
    out: str
    control_steps: int


def control_trend(rewards: list[float]) -> dict[str, float]:
    """First and last fifth of a reward curve and the step-to-step noise (std of the differences of all steps)."""
    rew = np.asarray(rewards, dtype=float)
    k = max(1, len(rew) // 5)
    noise = float(np.std(np.diff(rew), ddof=1)) if len(rew) > 2 else float("nan")
    return {"first": float(rew[:k].mean()), "last": float(rew[-k:].mean()), "step_noise": noise}


def _job_config(job: Job) -> TrainConfig:
    extra = [f"seed={job.seed}", f"out_dir={Path(job.out) / job.kind / job.method / f'seed-{job.seed}'}", "threads=1"]
    if job.kind == "null":
        cfg = load_config(TrainConfig, [job.config, config_path(f"presets/{job.method}.yaml")], list(job.overrides))
        extra.append("rewards=" + json.dumps({"random": 1.0, **{k: 0.0 for k in cfg.rewards if k != "random"}}))
    if job.kind == "control":
        extra += [*CONTROL, f"steps={job.control_steps}"]
    return load_config(TrainConfig, [job.config, config_path(f"presets/{job.method}.yaml")],
                       [*job.overrides, *extra])


def run_job(job: Job) -> dict:
    """Train one run and score it (held-out and in-distribution) unless it is a positive control; a main run is
    also scored at its best sampler setting, chosen on training prompts (`experiments/baselines.py`)."""
    import torch

    torch.set_num_threads(1)
    cfg = _job_config(job)
    tr = Trainer(cfg, progress=False)
    out = {"job": job.__dict__, "rows": tr.run()}
    if job.kind != "control":
        sets = eval_sets(cfg.eval.per_category, cfg.eval.seed)
        for split, s in sets.items():
            out[split] = evaluate_set(tr.model, s, cfg.sampling, progress=False).to_json()
    if job.kind == "main":
        selection = selection_set(cfg.eval.per_category, cfg.eval.seed)
        best = trained_at_best(tr.model, selection, sets["heldout"], cfg.sampling, _settings(), progress=False)
        out["best"] = {"setting": best.setting.label, "heldout": best.heldout.to_json(), "seconds": best.seconds}
    return out


def _settings():
    return grid_settings(GUIDANCES, TEMPERATURES)


def _change(base: dict, after: dict) -> dict:
    """Final strict accuracy and its paired change against the base (same prompts and seeds)."""
    b, a = EvalResult.from_json(base), EvalResult.from_json(after)
    return {"final": a.summary["overall"]["strict"], "change": paired_strict_change(b, a)["overall"]}


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    arr = np.asarray(values, dtype=float) * scale
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.{digits}f}"


def _plot_name(key: str) -> str:
    return f"compare_{key.replace('/', '_')}.png"


def run_compare(config: str | None, out: Path, methods: list[str], seeds: list[int], overrides: list[str],
                control_steps: int, quiet: bool = False, results_doc: Path | None = None, workers: int = 2) -> dict:
    for sub in ("main", "null", "control"):
        if (out / sub).is_dir():
            # compare owns these folders: a second `make compare` starts over instead of refusing to run
            print(f"removing the previous comparison's {out / sub}")
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = config or config_path("compare.yaml")
    jobs = [Job(m, s, kind, str(cfg_file), tuple(overrides), str(out), control_steps)
            for m in methods for kind in ("main", "control") for s in seeds]
    jobs += [Job(m, seeds[0], "null", str(cfg_file), tuple(overrides), str(out), control_steps) for m in methods]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_job, jobs))
    else:
        done = [run_job(j) for j in jobs]
    # the base, scored once with the runs' evaluation settings (every run's change is paired with it), and at its
    # best setting (its grid from the result cache after the first run)
    cfg0 = load_config(TrainConfig, cfg_file, overrides)
    base_model = load_model(cfg0.model, cfg0.device)
    sets = eval_sets(cfg0.eval.per_category, cfg0.eval.seed)
    base = {split: evaluate_set(base_model, s, cfg0.sampling, progress=False).to_json()
            for split, s in sets.items()}
    selection = selection_set(cfg0.eval.per_category, cfg0.eval.seed)
    base_best = base_at_best(cfg0.model, base_model, selection, sets["heldout"], cfg0.sampling, _settings(),
                             progress=not quiet)
    results: dict = {"methods": {}, "control": {}, "workers": workers,
                     "base_strict": _change(base["heldout"], base["heldout"])["final"],
                     "base_train_strict": _change(base["train"], base["train"])["final"],
                     "base_best_setting": base_best.setting.label,
                     "base_best_strict": base_best.heldout.summary["overall"]["strict"],
                     "base_grid_source": base_best.grid.source(), "base_grid": base_best.grid.to_json()}
    curves: dict[str, list[list[dict]]] = {}
    for m in methods:
        main = [d for d in done if d["job"]["method"] == m and d["job"]["kind"] == "main"]
        null = next(d for d in done if d["job"]["method"] == m and d["job"]["kind"] == "null")
        control = [d for d in done if d["job"]["method"] == m and d["job"]["kind"] == "control"]
        runs = [d["rows"] for d in main]
        curves[m] = runs
        gn = [r["grad_norm"] for run in runs for r in run]
        held = [_change(base["heldout"], d["heldout"]) for d in main]
        at_best = [_change(base_best.heldout.to_json(), d["best"]["heldout"]) for d in main]
        train = [_change(base["train"], d["train"]) for d in main]
        null_held = _change(base["heldout"], null["heldout"])
        results["methods"][m] = {
            "final_strict": [h["final"] for h in held], "change": [h["change"] for h in held],
            "best_setting": [d["best"]["setting"] for d in main], "best_final_strict": [b["final"] for b in at_best],
            "best_change": [b["change"] for b in at_best],
            "best_seconds": float(np.mean([d["best"]["seconds"] for d in main])),
            "final_train_strict": [t["final"] for t in train], "train_change": [t["change"] for t in train],
            "null_final_strict": null_held["final"], "null_change": null_held["change"],
            "reward_first5": float(np.mean([np.mean([r["reward/mean"] for r in run[:5]]) for run in runs])),
            "reward_last5": float(np.mean([np.mean([r["reward/mean"] for r in run[-5:]]) for run in runs])),
            "kl_last": float(np.mean([run[-1].get("loss/kl", 0.0) for run in runs])),
            "grad_norm_mean": float(np.mean(gn)), "grad_norm_std": float(np.std(gn)),
            "step_seconds": float(np.mean([r["time/step"] for run in runs for r in run])),
        }
        trends = [control_trend([r["reward/mean"] for r in d["rows"]]) for d in control]
        results["control"][m] = {"seeds": trends, "steps": control_steps,
                                 "rises": sum(t["last"] - t["first"] > 3 * t["step_noise"] for t in trends)}
    for key in PLOTS:
        plot_comparison(curves, key, out / _plot_name(key), smoothing=0.6)
    table = comparison_table(results, seeds)
    (out / "compare.md").write_text(table + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    print(table)
    if results_doc is not None:
        description = (f"`margrpo compare` ({', '.join(methods)}; {cfg0.steps} steps per run on the "
                       f"{Path(cfg_file).name} settings; seeds {', '.join(map(str, seeds))}; positive control "
                       f"{control_steps} steps per seed; overrides: {' '.join(overrides) or 'none'}):")
        publish(results_doc, f"{description}\n\n{table}\n",
                [(out / _plot_name(key), _plot_name(key), key) for key in PLOTS],
                RESULTS_START, RESULTS_END)
    return results


def comparison_table(results: dict, seeds: list[int]) -> str:
    """Markdown: per method, held-out and in-distribution change (mean ± std over seeds, points), null, KL, ..."""
    lines = [f"Base: held-out {100 * results['base_strict']:.1f}%, in-distribution "
             f"{100 * results['base_train_strict']:.1f}% strict accuracy; at its best sampler setting "
             f"({results['base_best_setting']}, chosen on training prompts) held-out "
             f"{100 * results['base_best_strict']:.1f}%. Changes in points, mean ± std over seeds (a run's own "
             "paired s.e. is in compare.json). \"vs base at its best\": each trained model at its own best setting "
             "(chosen on training prompts) against the base at its best.", "",
             "| method | seeds | held-out change | held-out change vs base at its best | in-distribution change "
             "| null control: held-out change | reward first 5 → last 5 | KL (last) | grad norm | s/step "
             "| positive control: seeds rising (first → last, step noise) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m, r in results["methods"].items():
        c = results["control"][m]
        trend = ", ".join(f"{t['first']:.3f} → {t['last']:.3f} ({t['step_noise']:.3f})" for t in c["seeds"])
        lines.append(
            f"| {m} | {len(seeds)} | {_mean_std([x[0] for x in r['change']], 100)} | "
            f"{_mean_std([x[0] for x in r['best_change']], 100)} | "
            f"{_mean_std([x[0] for x in r['train_change']], 100)} | {100 * r['null_change'][0]:+.1f} ± "
            f"{100 * r['null_change'][1]:.1f} | {r['reward_first5']:.3f} → {r['reward_last5']:.3f} | "
            f"{r['kl_last']:.2e} | {r['grad_norm_mean']:.3f} ± {r['grad_norm_std']:.3f} | "
            f"{r['step_seconds']:.2f} | {c['rises']} of {len(c['seeds'])} ({trend}) |")
    return "\n".join(lines)
