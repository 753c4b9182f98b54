"""The demo's training step on 1 process and on 2 (torchrun, DDP, gloo on CPU), one thread per process.

Both sides draw the same global batch (`distributed.rollout_shards=2`: two shards of whole groups, whichever
processes draw them), so the ratio is images per second for the same work. The runs alternate (1, 2, 1, 2, ...)
so that each ratio pairs two runs minutes apart at most; a figure is the median over the repetitions with its
inter-quartile range. The one-process, two-thread step (what the demo runs by default) is measured beside them.
Run: `python -m benchmarks.bench_distributed [--steps 5 --repeats 3]`.
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

from benchmarks.common import machine, median_spread, write_results
from margrpo.configs import config_path
from margrpo.rl.config import TrainConfig
from margrpo.utils.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["setup", "processes", "threads/process", "s/step", "s/step IQR", "images/s", "speed vs 1 process",
           "speed IQR", "rollout s", "update s", "images/step", "repeats"]


def run_once(out: Path, processes: int, threads: int, steps: int, device: str) -> list[dict]:
    """One run of the demo config for `steps` steps; its metrics rows (rank 0's), the warm-up step dropped."""
    overrides = [f"out_dir={out}", f"steps={steps}", f"threads={threads}", f"device={device}", "eval.every=0",
                 "log.sample_every=100000", "log.checkpoint_every=100000", "log.tensorboard=false",
                 "distributed.rollout_shards=2"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    cmd = [*launcher, "-m", "margrpo.cli", "train", str(config_path("demo.yaml")), *overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[1:]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first is a warm-up, not counted)")
    ap.add_argument("--repeats", type=int, default=3)
    args, _ = ap.parse_known_args(argv)
    setups = [("1 process", 1, 1), ("2 processes (DDP)", 2, 1), ("1 process, 2 threads", 1, 2)]
    step_times: dict[str, list[float]] = {name: [] for name, _, _ in setups}
    parts: dict[str, list[dict]] = {name: [] for name, _, _ in setups}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, procs, threads in setups:
                rows = run_once(Path(tmp) / f"{rep}-{procs}-{threads}", procs, threads, args.steps, args.device)
                step_times[name].append(float(np.median([r["time/step"] for r in rows])))
                parts[name] += rows
                print(f"repeat {rep + 1}/{args.repeats}, {name}: {step_times[name][-1]:.2f} s/step", flush=True)
    demo = load_config(TrainConfig, [config_path("demo.yaml")], []).algorithm
    images = demo.prompts_per_step * demo.group_size
    base = step_times["1 process"]
    out = []
    for name, procs, threads in setups:
        ts = step_times[name]
        med, iqr = median_spread(ts)
        speed, speed_iqr = median_spread([b / t for b, t in zip(base, ts, strict=True)])
        out.append({"setup": name, "processes": procs, "threads/process": threads, "s/step": med, "s/step IQR": iqr,
                    "images/s": images / med, "speed vs 1 process": speed, "speed IQR": speed_iqr,
                    "rollout s": float(np.median([r["time/rollout"] for r in parts[name]])),
                    "update s": float(np.median([r["time/update"] for r in parts[name]])),
                    "images/step": images, "repeats": args.repeats})
    md = write_results(f"distributed_{args.device}", out, COLUMNS,
                       {**machine(), "device": args.device, "threads": "1 per process", "steps": args.steps,
                        "config": "demo.yaml, distributed.rollout_shards=2"})
    print(md.read_text())


if __name__ == "__main__":
    main()
