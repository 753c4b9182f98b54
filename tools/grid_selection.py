"""How often a smaller selection set picks the setting the full one picks, from a `margrpo eval --grid --json` file.

`python tools/grid_selection.py GRID.json [--per-category 25 50 100] [--draws 2000]` draws, many times, a subset of
the grid's training-prompt images (`per-category` images per category, the same ones in every setting: each
setting scores the same prompts with the same seeds), chooses the setting on it, and reports how often that is the
setting the whole selection set chooses, and the mean held-out accuracy at the subset's choice: what a smaller
(cheaper) grid for the demo would cost. Seeded (numpy, seed 0), so it prints the same figures every time.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from margrpo.worlds.shapes.evaluate import EvalResult
from margrpo.worlds.shapes.sampler_grid import SamplerGrid, choose_setting


def subset(res: EvalResult, idx: list[int]) -> EvalResult:
    return EvalResult.from_json({"prompts": [res.prompts[i] for i in idx],
                                 "results": [res.results[i] for i in idx]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid_json")
    ap.add_argument("--per-category", type=int, nargs="+", default=[25, 50, 100, 200])
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    grid = SamplerGrid.from_json(json.loads(open(args.grid_json).read())["grid"])
    full = grid.chosen()
    held = {st: r.summary["overall"]["strict"] for st, r in zip(grid.settings, grid.results["heldout"], strict=True)}
    train = grid.results["train"]
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(train[0].results):
        by_cat.setdefault(r["category"], []).append(i)
    rng = np.random.default_rng(0)
    print(f"full selection set: {len(train[0].prompts)} images per setting, chooses {full.label} "
          f"(held-out {100 * held[full]:.1f}%)")
    print("| training images per category | same choice | held-out at the choice (mean) | choices |")
    print("|---:|---:|---:|---|")
    for m in args.per_category:
        picks = Counter()
        for _ in range(args.draws):
            idx = sorted(int(i) for ix in by_cat.values() for i in rng.choice(ix, size=min(m, len(ix)), replace=False))
            picks[choose_setting(grid.settings, [subset(r, idx) for r in train])] += 1
        mean_held = sum(n * held[st] for st, n in picks.items()) / args.draws
        top = ", ".join(f"{st.label}: {n / args.draws:.0%}" for st, n in picks.most_common(3))
        print(f"| {m} | {picks[full] / args.draws:.0%} | {100 * mean_held:.1f}% | {top} |")


if __name__ == "__main__":
    main()
