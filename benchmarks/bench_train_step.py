"""One RL step on the shipped shapes base: every preset on the demo's settings, and the demo itself on 1 and 2 threads.

Time split, images per second and peak memory. Speeds are ratios against the paper-faithful mar-grpo preset on the
demo settings (the demo's step before the noise-dominated head steps were dropped and ptx ran once per rollout)
measured in the same run; the reward is the colour fraction so that the verifier's cost does not enter.
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

BASELINE = "mar-grpo"
PRESETS = ("mar-grpo", "grpo", "mar-grpo-matching", "nft", "mar-grpo-nft")


def measure(files: list[str], tmp: Path, name: str, steps: int, device: str, dtype: str, threads: int) -> dict:
    out = tmp / f"{name}-{threads}"
    cfg = load_config(TrainConfig, files, [
        f"out_dir={out}", f"steps={steps}", "rewards={colour_fraction: 1.0}", "log.sample_every=1000",
        "log.checkpoint_every=1000", "log.tensorboard=false", "eval.every=0", f"device={device}",
        f"autocast={'bf16' if dtype == 'bfloat16' else 'none'}", f"threads={threads}"])
    torch.set_num_threads(threads)
    metrics = Trainer(cfg, progress=False).run()[1:]  # drop the warm-up step
    step = float(np.median([m["time/step"] for m in metrics]))
    images = cfg.algorithm.prompts_per_step * cfg.algorithm.group_size
    return {"method": name, "threads": threads, "s/step": step,
            "s/step spread": float(np.percentile([m["time/step"] for m in metrics], 75)
                                   - np.percentile([m["time/step"] for m in metrics], 25)),
            "images/s": images / step,
            "rollout s": float(np.median([m["time/rollout"] for m in metrics])),
            "update s": float(np.median([m["time/update"] for m in metrics])),
            "peak GB": float(max(m["memory/peak_gb"] for m in metrics)), "images/step": images}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=4)
    args, _ = ap.parse_known_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = [config_path("demo.yaml")]
        for preset in PRESETS:
            rows.append(measure([*demo, config_path(f"presets/{preset}.yaml")], Path(tmp), preset, args.steps,
                                args.device, args.dtype, 1))
        for threads in (1, 2):
            rows.append(measure(demo, Path(tmp), "demo", args.steps, args.device, args.dtype, threads))
    torch.set_num_threads(1)
    base = next(r for r in rows if r["method"] == BASELINE)
    for r in rows:
        r["speed vs mar-grpo"] = r["images/s"] / base["images/s"]
    md = write_results(f"train_step_{args.device}_{args.dtype}", rows,
                       ["method", "threads", "s/step", "s/step spread", "images/s", "speed vs mar-grpo", "rollout s",
                        "update s", "peak GB", "images/step"],
                       {**machine(), "device": args.device, "dtype": args.dtype})
    print(md.read_text())


if __name__ == "__main__":
    main()
