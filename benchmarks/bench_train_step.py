"""One RL step, GRPO vs MAR-GRPO (trajectory and matching estimators) on the shipped shapes base.

Time split and peak memory; times are ratios against GRPO measured in the same run, with the demo's
settings (including its ptx term) and the colour-fraction reward.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, write_results
from margrpo.configs import config_path
from margrpo.rl.config import TrainConfig
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_step = None
        for method in ("grpo", "mar-grpo", "mar-grpo-matching"):
            cfg = load_config(TrainConfig, [config_path("demo.yaml"), config_path(f"presets/{method}.yaml")], [
                f"out_dir={Path(tmp) / method}",
                f"steps={args.steps}", "rewards={colour_fraction: 1.0}", "log.sample_every=1000",
                "log.checkpoint_every=1000", "log.tensorboard=false", f"device={args.device}",
                f"autocast={'bf16' if args.dtype == 'bfloat16' else 'none'}", f"threads={args.threads}"])
            metrics = Trainer(cfg, progress=False).run()[1:]  # drop the warm-up step
            step = float(np.median([m["time/step"] for m in metrics]))
            base_step = base_step or step
            rows.append({
                "method": method, "s/step": step, "relative": step / base_step,
                "rollout s": float(np.median([m["time/rollout"] for m in metrics])),
                "reward s": float(np.median([m["time/reward"] for m in metrics])),
                "update s": float(np.median([m["time/update"] for m in metrics])),
                "peak GB": float(max(m["memory/peak_gb"] for m in metrics)),
                "images/step": cfg.algorithm.prompts_per_step * cfg.algorithm.group_size,
            })
    md = write_results(f"train_step_{args.device}_{args.dtype}", rows,
                       ["method", "s/step", "relative", "rollout s", "reward s", "update s", "peak GB", "images/step"],
                       {**machine(), "device": args.device, "dtype": args.dtype})
    print(md.read_text())


if __name__ == "__main__":
    main()
