"""Sampling throughput: images/s without recording, with recording, with MTE chains, and exact replay cost.

Ratios are against the plain (no recording) sampler measured in the same run, so they survive a
busy machine better than absolute numbers. Run: `python -m benchmarks.bench_sampling [--device cuda]`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine, timeit, write_results
from margrpo.models.loading import load_model
from margrpo.sampling.replay import score_transitions, step_conditions
from margrpo.sampling.sampler import SamplerConfig, sample


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ar-steps", type=int, default=8)
    ap.add_argument("--diffusion-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    model = load_model("shipped:shapes-base", dev).eval()
    model.head.set_sampling_steps(args.diffusion_steps)
    cond = model.encode_prompts(["a red circle left of a blue square"] * args.batch)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def run(**kw):
        cfg = SamplerConfig(num_ar_steps=args.ar_steps, **kw)
        with autocast:
            return sample(model.policy, cond, args.batch, cfg, torch.Generator(dev).manual_seed(0),
                          torch.Generator(dev).manual_seed(1))

    variants = [
        ("plain", dict(record=False)),
        ("record all steps", dict(record=True, record_z=False)),
        ("record all steps + z", dict(record=True)),
        ("record, diffuse all unknown", dict(record=True, record_z=False, policy_tokens="unknown")),
        ("record + MTE K=4 (commit)", dict(record=True, record_z=False, mte_k=4)),
        ("CFG 3 + record", dict(record=True, record_z=False, guidance_scale=3.0)),
    ]
    rows = []
    base = None
    for name, kw in variants:
        t = timeit(lambda kw=kw: run(**kw), repeats=args.repeats)
        ips = args.batch / t["median_s"]
        base = base or ips
        rows.append({"variant": name, "images/s": ips, "relative time": base / ips, "seconds": t["median_s"]})
    r = run(record=True, record_z=False)
    js = [j for j in range(r.head_steps) if model.head.is_stochastic(j)]

    def replay():
        with torch.no_grad(), autocast:
            for i in r.steps:
                score_transitions(model.head, r.steps[i].x, js, step_conditions(model.policy, r, i), r.temperature)

    t = timeit(replay, repeats=args.repeats)
    rows.append({"variant": "exact replay of all steps (no grad)", "images/s": args.batch / t["median_s"],
                 "relative time": t["median_s"] / (args.batch / base), "seconds": t["median_s"]})
    meta = {**machine(), "device": args.device, "dtype": args.dtype, "batch": args.batch, "ar_steps": args.ar_steps,
            "diffusion_steps": args.diffusion_steps, "params": model.policy.num_parameters()}
    md = write_results(f"sampling_{args.device}_{args.dtype}", rows,
                       ["variant", "images/s", "relative time", "seconds"], meta)
    print(md.read_text())


if __name__ == "__main__":
    main()
