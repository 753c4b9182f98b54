"""The training-reward curve of a model that does not learn: the demo's prompt stream scored on the untrained base.

`python tools/reward_stream.py [--steps 150] [--balance stratified random]` draws the demo's prompts of steps
0..steps-1 (prompts.category_balance as given, the demo's seed, prompts_per_step and group size), samples each
step's images with the base model and the demo's sampler, and prints per balance mode: the mean reward (the
verifier's partial score, the demo's reward) of the first and last 5 steps and the step-to-step spread of the
step means. With no training a curve should be flat; any trend or spread it shows is the prompt stream's, not
learning. Deterministic from the seeds (one thread).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from margrpo.configs import config_path
from margrpo.models.loading import load_model
from margrpo.rl.config import TrainConfig
from margrpo.rl.prompts import PromptSource
from margrpo.utils.config import load_config
from margrpo.worlds.shapes.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--balance", nargs="+", default=["stratified", "random"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| category_balance | steps | reward, first 5 steps | reward, last 5 steps | std of step means |"
          " distinct category mixes |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode in args.balance:
        cfg = load_config(TrainConfig, config_path("demo.yaml"), [f"prompts.category_balance={mode}"])
        model = load_model(cfg.model, "cpu")
        src, a = PromptSource(cfg), cfg.algorithm
        means, mixes = [], []
        for step in range(args.steps):
            prompts, meta = src.batch(step, a.prompts_per_step)
            res = evaluate(model, [p for p in prompts for _ in range(a.group_size)], cfg.sampling,
                           seed=1_000_000 + step, progress=False)
            means.append(float(np.mean([r["partial"] for r in res.results])))
            mixes.append(tuple(sorted(m["category"] for m in meta)))
        m = np.asarray(means)
        print(f"| {mode} | {args.steps} | {m[:5].mean():.3f} | {m[-5:].mean():.3f} | {m.std(ddof=1):.3f} | "
              f"{len(set(mixes))} |")


if __name__ == "__main__":
    main()
