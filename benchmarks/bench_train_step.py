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
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from benchmarks.common import PeakMemory, machine, median_spread, write_results
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


AR_STEPS = 8  # the demo's sampling.ar_steps: the sweep scores ar of them (algorithm.ar_step_fraction)
SCALING_COLUMNS = ["sweep", "method", "G", "K", "scored AR steps", "s/step", "s/step IQR",
                   "time vs grpo", "time vs grpo IQR", "peak MB", "peak MB IQR", "memory vs grpo",
                   "memory vs grpo IQR", "GFLOP/step", "FLOPs vs grpo", "grpo s/step", "grpo peak MB",
                   "marginal s/unit", "marginal MB/unit", "repeats"]


class _Runner:
    """A trainer kept alive so that its steps can be interleaved with another's (paired in time)."""

    def __init__(self, files: list[str], tmp: Path, name: str, overrides: list[str], device: str, dtype: str):
        cfg = load_config(TrainConfig, files, [
            f"out_dir={tmp / name}", "steps=1000", "rewards={colour_fraction: 1.0}", "log.sample_every=1000",
            "log.checkpoint_every=1000", "log.tensorboard=false", "eval.every=0", f"device={device}",
            f"autocast={'bf16' if dtype == 'bfloat16' else 'none'}", "threads=1", "algorithm.ptx_weight=0",
            "algorithm.ppo_epochs=1", "algorithm.head_steps_per_ar_step=4", *overrides])
        self.trainer = Trainer(cfg, progress=False)
        self.peak = PeakMemory(device)
        self.step = 0
        self._flops: float | None = None
        self.step_once()  # warm-up: caches and allocators

    def step_once(self) -> tuple[float, float]:
        """(seconds, peak MB) of one training step."""
        t0 = time.perf_counter()
        with self.peak.measure():
            self.trainer.train_step(self.step)
        self.step += 1
        return time.perf_counter() - t0, self.peak.peak_bytes / 2**20

    def flops(self) -> float:
        """Floating-point operations of one training step (rollout, replay and backward; torch's formulas count
        matrix multiplies and convolutions), measured once: the work a step does, whatever the machine's speed."""
        if self._flops is None:
            counter = _FlopCount()
            with counter:
                self.trainer.train_step(self.step)
            self.step += 1
            self._flops = float(counter.total)
        return self._flops


class _FlopCount(TorchDispatchMode):
    """torch's FLOP formulas (`torch.utils.flop_counter.flop_registry`) summed over every op. FlopCounterMode itself
    tracks modules with backward hooks, which `torch.autograd.grad` on leaves (the trajectory loss) rejects."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _paired(base: _Runner, variant: _Runner, repeats: int) -> dict:
    """Baseline and variant steps alternated, so each ratio compares two steps measured seconds apart (the
    machine's load drifts over minutes); medians and IQRs over the repetitions."""
    bt, bm, vt, vm = [], [], [], []
    for _ in range(repeats):
        t, m = base.step_once()
        bt.append(t)
        bm.append(m)
        t, m = variant.step_once()
        vt.append(t)
        vm.append(m)
    out = {}
    out["s/step"], out["s/step IQR"] = median_spread(vt)
    out["peak MB"], out["peak MB IQR"] = median_spread(vm)
    out["time vs grpo"], out["time vs grpo IQR"] = median_spread([v / b for v, b in zip(vt, bt, strict=True)])
    out["memory vs grpo"], out["memory vs grpo IQR"] = median_spread(
        [v / b for v, b in zip(vm, bm, strict=True) if b > 0] or [float("nan")])
    out["grpo s/step"], out["grpo peak MB"] = median_spread(bt)[0], median_spread(bm)[0]
    out["GFLOP/step"] = variant.flops() / 1e9
    out["FLOPs vs grpo"] = variant.flops() / base.flops()
    out["memory_method"] = variant.peak.method
    out["repeats"] = repeats
    return out


def scaling(tmp: Path, quick: bool, device: str, dtype: str) -> list[dict]:
    """Step time and peak memory of mar-grpo against G, K and the scored AR steps.

    Every row is a ratio to plain grpo at the same group size G and scored AR steps, its steps alternated with the
    row's in this run; `marginal */unit` is the increase from the sweep's previous point per unit of the swept
    quantity (constant = linear growth). The `cost split` rows add mar-grpo's parts one at a time. `FLOPs vs grpo`
    is the work ratio: a time ratio near it says the extra time is the algorithm's arithmetic, not overhead.
    """
    demo = [config_path("demo.yaml")]
    grpo, mar = config_path("presets/grpo.yaml"), config_path("presets/mar-grpo.yaml")
    repeats = 3 if quick else 5
    prompts = ["algorithm.prompts_per_step=1"] if quick else ["algorithm.prompts_per_step=2"]
    ar_default = 4  # of the demo's AR_STEPS
    bases: dict[tuple[int, int], _Runner] = {}

    def base(g: int, ar: int) -> _Runner:
        if (g, ar) not in bases:
            bases[(g, ar)] = _Runner([*demo, grpo], tmp, f"grpo-g{g}-ar{ar}",
                                     [*prompts, f"algorithm.group_size={g}",
                                      f"algorithm.ar_step_fraction={ar / AR_STEPS}"], device, dtype)
        return bases[(g, ar)]

    def run(g: int, k: int, ar: int, preset: str = mar, extra: tuple[str, ...] = (),
            method: str | None = None) -> dict:
        over = [*prompts, f"algorithm.group_size={g}", f"algorithm.ar_step_fraction={ar / AR_STEPS}",
                f"algorithm.mte_k={k}", *extra]
        variant = _Runner([*demo, preset], tmp, f"{method or 'mar'}-g{g}-k{k}-ar{ar}", over, device, dtype)
        r = _paired(base(g, ar), variant, repeats)
        del variant
        r.update({"method": method or "mar-grpo", "G": g, "K": k, "scored AR steps": ar})
        return r

    rows: list[dict] = []

    def add(sweep: str, points: list[dict]) -> None:
        prev = None
        for r in points:
            r["sweep"] = sweep
            if prev is not None and sweep in r and r[sweep] != prev[sweep]:
                d = r[sweep] - prev[sweep]
                r["marginal s/unit"] = (r["s/step"] - prev["s/step"]) / d
                r["marginal MB/unit"] = (r["peak MB"] - prev["peak MB"]) / d
            prev = r
            rows.append(r)

    add("K", [run(8, k, ar_default) for k in (2, 4, 8)])
    add("G", [run(g, 4, ar_default) for g in (4, 8, 16)])
    add("scored AR steps", [run(8, 4, ar) for ar in (1, 2, 4)])
    # Where mar-grpo's time goes: the paper's policy term covers every still-unknown token (so the rollout diffuses
    # them all at every AR step), against plain grpo's committed tokens; then the consistency filter (the preset's);
    # then MTE: the K sweep's K=4 row, the same configuration.
    add("cost split", [
        run(8, 0, ar_default, grpo, ("algorithm.policy_tokens=unknown",), "grpo, all unknown tokens"),
        run(8, 0, ar_default, mar, (), "mar-grpo without MTE"),
    ])
    return rows


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
    ap.add_argument("--quick", action="store_true", help="fewer images and repetitions in the scaling sweep")
    ap.add_argument("--scaling-only", action="store_true", help="only the G / K / scored-AR-step sweep")
    args, _ = ap.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        srows = scaling(Path(tmp), args.quick, args.device, args.dtype)
    md = write_results(f"train_step_scaling_{args.device}_{args.dtype}", srows, SCALING_COLUMNS,
                       {**machine(), "device": args.device, "dtype": args.dtype, "quick": args.quick,
                        "memory": srows[0]["memory_method"], "threads": 1})
    print(md.read_text())
    if args.scaling_only:
        return
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
