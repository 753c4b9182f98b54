"""Sampling throughput: images/s without recording, with recording, with MTE chains, and exact replay cost.

Ratios are against the plain (no recording) sampler measured in the same run, so they survive a
busy machine better than absolute numbers. `--against REV` also times the recording variants with the sampler
module of git revision REV (its source loaded next to this checkout's, the rest of the package shared), so a
sampler change is a ratio measured in the same run. Run: `python -m benchmarks.bench_sampling [--device cuda]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import torch

from benchmarks.common import machine, median_spread, write_results
from margrpo.models.loading import load_model
from margrpo.rl.loss import replay_transitions, step_z
from margrpo.sampling import sampler as current
from margrpo.sampling.config import RecordPlan, SamplerConfig


def sampler_at(rev: str) -> types.ModuleType:
    """`margrpo.sampling.sampler` as of git revision `rev`, loaded as a separate module."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/margrpo/sampling/sampler.py"],
                         capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader(f"sampler_at_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    exec(compile(src, f"{rev}:sampler.py", "exec"), module.__dict__)  # noqa: S102 - this repository's own source
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ar-steps", type=int, default=8)
    ap.add_argument("--diffusion-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--against", metavar="REV", help="also time the sampler module of this git revision")
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = load_model("shipped:shapes-base", dev).eval()
    model.head.set_sampling_steps(args.diffusion_steps)
    cond = model.encode_prompts(["a red circle left of a blue square"] * args.batch)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    old = sampler_at(args.against) if args.against else None
    if old is not None:  # an old sampler module runs on this checkout's package: say so if they no longer fit
        try:
            cfg = old.SamplerConfig(num_ar_steps=args.ar_steps, record=True)
            probe = model.encode_prompts(["a red circle"])
            old.sample(model.policy, probe, 1, cfg, torch.Generator(dev).manual_seed(0))
        except Exception as e:  # noqa: BLE001 - any mismatch between the old module and this package
            raise SystemExit(f"--against {args.against}: that revision's sampler does not run on this checkout's "
                             f"package ({type(e).__name__}: {e}); pick a revision nearer this one") from None
    import time

    def run(module=None, record: bool = True, guidance_scale: float = 1.0, **plan):
        gens = (torch.Generator(dev).manual_seed(0), torch.Generator(dev).manual_seed(1))
        with autocast:
            if module is not None:  # a revision before issue #25: one config object with the record fields
                cfg = module.SamplerConfig(num_ar_steps=args.ar_steps, record=record, guidance_scale=guidance_scale,
                                           **plan)
                return module.sample(model.policy, cond, args.batch, cfg, *gens)
            cfg = SamplerConfig(ar_steps=args.ar_steps, diffusion_steps=args.diffusion_steps,
                                guidance_scale=guidance_scale)
            return current.sample(model.policy, cond, args.batch, cfg, *gens,
                                  record=RecordPlan(**{"record_z": True, **plan}) if record else None)

    variants = [
        ("plain", dict(record=False)),
        ("record all steps", dict(record=True, record_z=False)),
        ("record all steps + z", dict(record=True)),
        ("record, diffuse all unknown", dict(record=True, record_z=False, policy_tokens="unknown")),
        ("record + MTE K=4 (commit)", dict(record=True, record_z=False, mte_k=4)),
        ("unknown + MTE K=4 (the mar-grpo rollout)", dict(record=True, record_z=False, mte_k=4,
                                                          policy_tokens="unknown")),
        ("CFG 3 + record", dict(record=True, record_z=False, guidance_scale=3.0)),
    ]
    # Each variant's alternatives run alternately, repetition by repetition, so every "vs this sampler" ratio
    # pairs two runs measured seconds apart (a loaded machine drifts over minutes): this checkout's sampler, the
    # sampler at --against.
    rows = []
    base = None
    for name, kw in variants:
        alts = {name: (None, kw)}
        if old is not None and kw.get("record", True):
            alts[f"{name} [sampler at {args.against}]"] = (old, kw)
        times: dict[str, list[float]] = {a: [] for a in alts}
        for module, k in alts.values():  # warm-up
            run(module, **k)
        for _ in range(args.repeats):
            for a, (module, k) in alts.items():
                t0 = time.perf_counter()
                run(module, **k)
                times[a].append(time.perf_counter() - t0)
        for a, ts in times.items():
            med, iqr = median_spread(ts)
            base = base or med
            ratio, ratio_iqr = median_spread([x / y for x, y in zip(ts, times[name], strict=True)])
            rows.append({"variant": a, "images/s": args.batch / med, "relative time": med / base, "seconds": med,
                         "seconds IQR": iqr, "time vs this sampler": ratio, "IQR of that ratio": ratio_iqr})
    r = run(record=True, record_z=False)
    js = [j for j in range(r.head_steps) if model.head.is_stochastic(j)]

    def replay():
        with torch.no_grad(), autocast:
            for i in r.steps:
                replay_transitions(model.head, r.steps[i].x, js, step_z(model.policy, r, i), r.temperature)

    replay()
    ts = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        replay()
        ts.append(time.perf_counter() - t0)
    med, iqr = median_spread(ts)
    rows.append({"variant": "exact replay of all steps (no grad)", "images/s": args.batch / med,
                 "relative time": med / base, "seconds": med, "seconds IQR": iqr})
    meta = {**machine(), "against": args.against,
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "ar_steps": args.ar_steps,
            "diffusion_steps": args.diffusion_steps, "params": model.policy.num_parameters()}
    md = write_results(f"sampling_{args.device}_{args.dtype}", rows,
                       ["variant", "images/s", "relative time", "seconds", "seconds IQR", "time vs this sampler",
                        "IQR of that ratio"], meta)
    print(md.read_text())


if __name__ == "__main__":
    main()
