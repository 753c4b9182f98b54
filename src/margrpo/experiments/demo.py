"""`margrpo demo`: RL fine-tuning of the shipped shapes base (demo.yaml), scored before and after on held-out prompts.

Each gain is reported twice (`experiments/baselines.py`): against the base at the same sampler settings, and against
the base at its best guidance x temperature setting, the trained model also at its best, both chosen on training
prompts. The base's grid comes from the result cache after the first run (`~/.cache/margrpo/sampler-grid/`).

Writes under the output folder: `before.json`, `after.json` (both with the reward-hacking monitors' image
statistics), `base_best.json`, `after_best.json`, `results.md` (per-category tables, the base's grid, the
statistics' drift), `grid_before_after.png` (the same seeds before | after), the training run (`run/`, with
`report.png`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from margrpo.configs import config_path
from margrpo.experiments.baselines import (
    AtBest,
    base_at_best,
    best_change,
    gain_line,
    selection_set,
    trained_at_best,
)
from margrpo.experiments.results_doc import publish
from margrpo.models.loading import load_model
from margrpo.rl.config import TrainConfig
from margrpo.rl.monitors import DriftMonitor, compare, drift_table, token_period
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config
from margrpo.utils.images import make_grid, save_png, side_by_side, to_pil
from margrpo.utils.metrics import read_metrics
from margrpo.worlds import shapes
from margrpo.worlds.shapes.evaluate import EvalResult, eval_sets, evaluate_set, paired_strict_change
from margrpo.worlds.shapes.sampler_grid import GUIDANCES, TEMPERATURES, grid_settings


def comparison_table(before: EvalResult, after: EvalResult, names: tuple[str, str] = ("before", "after")) -> str:
    """Per-category before/after table; the strict change carries its paired standard error (same seeds)."""
    change = paired_strict_change(before, after)
    b_name, a_name = names
    lines = [f"| category | n | strict {b_name} | strict {a_name} | change ± s.e. | partial {b_name} | "
             f"partial {a_name} |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in [*shapes.CATEGORIES, "overall"]:
        if c not in before.summary:
            continue
        b, a = before.summary[c], after.summary[c]
        delta, se = change[c]
        lines.append(f"| {c} | {int(b['n'])} | {100 * b['strict']:.1f}% | {100 * a['strict']:.1f}% | "
                     f"{100 * delta:+.1f} ± {100 * se:.1f} | {100 * b['partial']:.1f}% | "
                     f"{100 * a['partial']:.1f}% |")
    return "\n".join(lines)


def best_section(base: AtBest, trained: AtBest, selection_images: int) -> str:
    """The held-out table of both models at their best sampler settings, with how those were chosen."""
    settings = base.grid.settings
    guidances = "/".join(dict.fromkeys(f"{st.guidance_scale:g}" for st in settings))
    temperatures = "/".join(dict.fromkeys(f"{st.temperature:g}" for st in settings))
    table = comparison_table(base.heldout, trained.heldout, ("base at best", "trained at best"))
    return (f"Both at their best sampler settings, each chosen on {selection_images} training-prompt images per "
            f"setting of a guidance {guidances} x temperature {temperatures} grid (never on held-out prompts): the "
            f"base at {base.setting.label}, the trained model at {trained.setting.label}:\n\n{table}")


def picture_indices(res: EvalResult, per_category: int = 4) -> list[int]:
    """Images for the before | after picture: `per_category` distinct prompts of each category, spread over its
    prompts (an evaluation set repeats the 3 held-out single prompts)."""
    first: dict[str, dict[str, int]] = {}
    for i, (p, r) in enumerate(zip(res.prompts, res.results, strict=True)):
        first.setdefault(str(r.get("category", "unknown")), {}).setdefault(p, i)
    out = []
    for by_prompt in first.values():
        idx = list(by_prompt.values())
        for j in np.linspace(0, len(idx) - 1, min(per_category, len(idx))).round().astype(int):
            out.append(idx[j])
    return out


def eval_curve_table(rows: list[dict]) -> str:
    """The in-loop evaluations of a run (`eval.every`): strict accuracy and its paired change against step 0, of the
    weights and (with `eval.ema_decay`) of their EMA, held-out and (with `eval.in_distribution`) in-distribution."""

    def cell(row: dict, prefix: str) -> str:
        if f"{prefix}/strict" not in row:
            return ""
        out = f"{100 * row[f'{prefix}/strict']:.1f}%"
        if f"{prefix}/strict_change" in row:
            out += f" ({100 * row[f'{prefix}/strict_change']:+.1f} ± {100 * row[f'{prefix}/strict_change_se']:.1f})"
        return out

    evals = [r for r in rows if "eval/heldout/strict" in r]
    columns = [("held-out", "eval/heldout"), ("held-out, EMA", "eval_ema/heldout"),
               ("in-distribution", "eval/train"), ("in-distribution, EMA", "eval_ema/train")]
    columns = [(name, key) for name, key in columns if any(f"{key}/strict" in r for r in evals)]
    lines = ["| step | " + " | ".join(name for name, _ in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    lines += [f"| {r['step']} | " + " | ".join(cell(r, key) for _, key in columns) + " |" for r in evals]
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, quiet: bool = False, overrides: list[str] | None = None,
             results_doc: Path | None = None, config: str = "demo.yaml") -> int:
    """Evaluate the base, train with the shipped `config`, evaluate again; results into `results_doc`'s block named
    after the config (`<!-- demo-results:start -->` for demo.yaml, `<!-- demo-long-results:start -->` ...)."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    ov = [f"out_dir={out / 'run'}", *(overrides or [])]
    if quick:
        ov += ["steps=4", "log.sample_every=2", "log.checkpoint_every=2", "eval.every=2", "eval.per_category=2"]
    cfg = load_config(TrainConfig, config_path(config), ov)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())  # the evaluations run with the training's threads
    run_dir = Path(cfg.out_dir)
    if run_dir.is_dir() and (run_dir / "config.yaml").is_file():
        # the demo owns this folder: a second `make demo` starts over instead of refusing to run
        print(f"removing the previous demo run in {run_dir}")
        shutil.rmtree(run_dir)
    sets = eval_sets(8 if quick else cfg.eval.per_category, cfg.eval.seed)
    selection = selection_set(2 if quick else cfg.eval.per_category, cfg.eval.seed)  # chooses the settings
    settings = grid_settings((1.0, 3.0), (1.0, 0.5)) if quick else grid_settings(GUIDANCES, TEMPERATURES)
    prompts = list(sets["heldout"].prompts)
    sampler = cfg.sampling
    base = load_model(cfg.model, cfg.device)
    before = evaluate_set(base, sets["heldout"], sampler, progress=not quiet)
    train_before = evaluate_set(base, sets["train"], sampler, progress=not quiet)  # in-distribution, fresh seeds
    base_best = base_at_best(cfg.model, base, selection, sets["heldout"], sampler, settings, progress=not quiet)
    trainer = Trainer(cfg, progress=not quiet)
    t0 = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - t0
    after = evaluate_set(trainer.model, sets["heldout"], sampler, progress=not quiet)
    train_after = evaluate_set(trainer.model, sets["train"], sampler, progress=not quiet)
    after_best = trained_at_best(trainer.model, selection, sets["heldout"], sampler, settings, progress=not quiet)
    # the reward-hacking monitors' statistics (and watched rewards) of the held-out images, before and after
    monitor = DriftMonitor(cfg.monitors.bounds, cfg.monitors.watch, out, token_period(base), cfg.device)
    stats = {"before": monitor.measure(before.images, prompts), "after": monitor.measure(after.images, prompts)}
    drifts = compare(stats["before"], stats["after"], monitor.bounds, monitor.watched)
    table = comparison_table(before, after)
    same, best = paired_strict_change(before, after)["overall"], best_change(base_best, after_best)
    delta, se = paired_strict_change(train_before, train_after)["overall"]
    in_dist = (f"In-distribution (training prompts, {len(train_before.prompts)} images, fresh seeds): "
               f"{100 * train_before.summary['overall']['strict']:.1f}% → "
               f"{100 * train_after.summary['overall']['strict']:.1f}% ({100 * delta:+.1f} ± {100 * se:.1f}).")
    total_s = time.perf_counter() - t_start
    method = f"{cfg.algorithm.estimator} estimator"
    pick = picture_indices(before)
    labels = [prompts[i] for i in pick]
    grid = side_by_side(make_grid(to_pil(before.images[pick]), nrow=4, labels=labels, upscale=3),
                        make_grid(to_pil(after.images[pick]), nrow=4, labels=labels, upscale=3),
                        titles=("before (base model)", f"after {cfg.steps} RL steps ({method})"))
    save_png(grid, out / "grid_before_after.png")
    results = {"before": before, "after": after, "train_before": train_before, "train_after": train_after,
               "base_best": base_best.heldout, "after_best": after_best.heldout}
    for name, res in results.items():
        record = {"summary": res.summary, "seconds": res.seconds, **res.to_json()}
        if name in stats:
            record["statistics"] = {k: float(np.nanmean(v)) for k, v in stats[name].items()}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / "baselines.json").write_text(json.dumps({
        "same_settings_change": same, "best_settings_change": best, "base_best": base_best.setting.label,
        "trained_best": after_best.setting.label, "base_grid": base_best.grid.to_json(),
        "trained_grid": after_best.grid.to_json(), "base_grid_seconds": base_best.seconds,
        "trained_grid_seconds": after_best.seconds, "train_seconds": train_s, "total_seconds": total_s}, indent=2))
    md = (f"Held-out strict accuracy, {len(prompts)} prompts, same seeds before and after "
          f"({cfg.steps} steps, {method}, {cfg.threads} thread{'s' if cfg.threads != 1 else ''}; "
          f"{train_s / 60:.1f} min training, {total_s / 60:.1f} min total):\n\n{table}\n\n"
          f"{best_section(base_best, after_best, len(selection.prompts))}\n\n"
          f"{gain_line(same, best, sampler)}\n\n{in_dist}\n\n"
          f"Sampler grids: the base's {base_best.grid.source()}; the trained model's {after_best.seconds:.0f}s. "
          f"The base's grid ({len(selection.prompts)} training-prompt images per setting; the held-out prompts are "
          f"sampled at the chosen setting only):\n\n{base_best.grid.table()}\n\n"
          "Reward-hacking monitors (docs/failures.md), the held-out images before and after; drift in standard "
          f"deviations of the base's images:\n\n{drift_table(drifts)}\n")
    if cfg.eval.every > 0:
        md += ("\nDuring training (strict accuracy, change ± paired s.e. against step 0 in points):\n\n"
               f"{eval_curve_table(read_metrics(run_dir))}\n")
    (out / "results.md").write_text(md)
    print(md)
    if results_doc is not None and not quick:
        stem = Path(config).stem
        publish(results_doc, md, [(out / "grid_before_after.png", f"{stem}_before_after.png", "before and after"),
                                  (out / "run" / "report.png", f"{stem}_report.png", "training curves")],
                f"<!-- {stem}-results:start -->", f"<!-- {stem}-results:end -->")
    print(f"grids: {out / 'grid_before_after.png'}; curves: {out / 'run' / 'report.png'}")
    return 0
