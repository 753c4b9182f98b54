"""One RL step on the shipped shapes base: every preset on the demo's settings, and the demo itself on 1 and 2 threads.

Time split, images per second and peak memory. Speeds are ratios against the paper-faithful mar-grpo preset on the
demo settings measured in the same run; the reward is the colour fraction so that the verifier's cost does not
enter. `--against REV` also measures the demo's step of the code at git revision REV (a temporary worktree running
its own copy of this benchmark, in the same run), so that a speed-up is a ratio against the old code on the same
machine, not against figures from another day.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def measure_revision(rev: str, steps: int, device: str, dtype: str) -> dict:
    """The demo's step at git revision `rev`: its own bench_train_step in a temporary worktree, its demo row read back.

    Revisions before the demo had its own row ran each preset on the demo's settings; the row of the preset that
    revision's demo.yaml names as its base is taken."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        added = subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), rev],
                               capture_output=True, text=True)
        if added.returncode:
            raise SystemExit(f"--against {rev}: cannot check out that revision ({added.stderr.strip()})")
        try:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "src"), str(tree)])}
            ran = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_step", f"--steps={steps}",
                                  f"--device={device}", f"--dtype={dtype}"], cwd=tree, env=env,
                                 capture_output=True, text=True)
            if ran.returncode:
                raise SystemExit(f"--against {rev}: its benchmark failed:\n{ran.stderr[-2000:]}")
            result = tree / "benchmarks" / "results" / f"train_step_{device}_{dtype}.json"
            rows = json.loads(result.read_text())["rows"]
            demo_yaml = (tree / "src" / "margrpo" / "configs" / "demo.yaml").read_text()
        finally:
            subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)
    demo_rows = [r for r in rows if r["method"] == "demo" and r.get("threads", 1) == 1]
    if not demo_rows:
        base = next(line.split(":", 1)[1].strip() for line in demo_yaml.splitlines() if line.startswith("base:"))
        demo_rows = [r for r in rows if r["method"] == Path(base).stem]
    row = dict(demo_rows[0])
    return {**row, "method": f"demo at {rev}", "threads": row.get("threads", 1),
            "images/s": row["images/step"] / row["s/step"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--against", metavar="REV", help="also measure the demo's step of the code at this git revision")
    args, _ = ap.parse_known_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        demo = [config_path("demo.yaml")]
        for preset in PRESETS:
            rows.append(measure([*demo, config_path(f"presets/{preset}.yaml")], Path(tmp), preset, args.steps,
                                args.device, args.dtype, 1))
        for threads in (1, 2):
            rows.append(measure(demo, Path(tmp), "demo", args.steps, args.device, args.dtype, threads))
    columns = ["method", "threads", "s/step", "s/step spread", "images/s", "speed vs mar-grpo", "rollout s",
               "update s", "peak GB", "images/step"]
    if args.against:
        before = measure_revision(args.against, args.steps, args.device, args.dtype)
        rows.append(before)
        columns.insert(6, f"speed vs demo at {args.against}")
    torch.set_num_threads(1)
    base = next(r for r in rows if r["method"] == BASELINE)
    for r in rows:
        r["speed vs mar-grpo"] = r["images/s"] / base["images/s"]
        if args.against:
            r[f"speed vs demo at {args.against}"] = r["images/s"] / before["images/s"]
    md = write_results(f"train_step_{args.device}_{args.dtype}", rows, columns,
                       {**machine(), "device": args.device, "dtype": args.dtype, "against": args.against})
    print(md.read_text())


if __name__ == "__main__":
    main()
