"""Reward throughput (images/s): in-process vs remote (``margrpo serve-reward`` over loopback).

Rewards measured:

- ``shapes``: the shapes-world verifier on its own rendered 32 px scenes (skipped, with a message, when
  ``margrpo.worlds.shapes`` does not import);
- ``clip_score`` with a CLIP ViT-B/32-sized model (transformers ``CLIPConfig()`` defaults: 224 px,
  12+12 layers) with random weights: the cost of a CLIP-B reward does not depend on the weights' values,
  and no weights can be downloaded here. Inputs are 256 px images (MAR's resolution).

The remote server runs in a separate process (as in deployment), started through the real CLI, with
the same number of torch threads as the in-process measurement, so the difference is the transport:
PNG encoding + JSON + HTTP on the client, decoding on the server. Run:
``python -m benchmarks.bench_rewards [--device cuda] [--batch 32] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, timeit, write_results

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _clip_b_dir(root: Path) -> Path:
    """A ViT-B/32-sized transformers CLIP (random weights) with a small local BPE tokenizer."""
    import transformers

    raw = root / "tokraw"
    raw.mkdir()
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(string.ascii_lowercase)})
    vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    d = root / "clip-b"
    cfg = transformers.CLIPConfig()  # defaults = openai/clip-vit-base-patch32 sizes
    cfg.text_config.eos_token_id = 53
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d)
    transformers.CLIPTokenizer.from_pretrained(str(raw), local_files_only=True).save_pretrained(d)
    return d


def _start_server(config: Path, device: str, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "MARGRPO_REWARD_TOKEN": ""}
    cmd = [sys.executable, "-c",
           f"import torch, sys; torch.set_num_threads({threads}); from margrpo.rewards.cli import main; "
           f"sys.exit(main(['serve-reward', '--config', {str(config)!r}, '--port', '0', '--device', {device!r}, "
           "'--log-level', 'WARNING']))"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if " at " not in line:
        proc.kill()
        raise RuntimeError(f"reward server did not start: {line!r}")
    return proc, line.split(" at ")[1].split()[0]


def _measure(name: str, reward, images, prompts, repeats: int) -> dict:
    reward(images[:2], prompts[:2])  # load/warm caches outside the timing
    out = reward(images, prompts)
    if not bool(out.valid.all()):
        raise RuntimeError(f"{name}: invalid samples during benchmark: {out.reasons[:3]}")
    t = timeit(lambda: reward(images, prompts), repeats=repeats, warmup=1)
    n = len(images)
    return {"images_per_s": n / t["median_s"], "ms_per_image": 1000 * t["median_s"] / n, "median_s": t["median_s"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-clip", action="store_true", help="measure shapes only")
    args, _ = ap.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from margrpo.rewards import build_reward
    from margrpo.rewards.remote import RemoteReward

    rows: list[dict] = []
    notes: list[str] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jobs: list[tuple[str, dict, list, list, int]] = []
        try:
            from margrpo.worlds import shapes as world

            prompts = [world.sample_train_prompt(rng) for _ in range(args.batch)]
            images = [world.render_scene(p, rng) for p in prompts]
            jobs.append(("shapes", {"shapes": {"mode": "partial"}}, images, prompts, images[0].size[0]))
        except Exception as e:  # noqa: BLE001 - the world may not have landed; say so and go on
            msg = f"shapes skipped: margrpo.worlds.shapes unavailable ({type(e).__name__}: {e})"
            print(msg)
            notes.append(msg)
        if not args.skip_clip:
            clip_dir = _clip_b_dir(root)
            images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(args.batch)]
            prompts = ["a red circle left of a blue square"] * args.batch
            jobs.append(("clip_score (ViT-B/32 size)", {"clip_score": {"model_path": str(clip_dir)}}, images, prompts,
                         256))
        for label, spec, images, prompts, px in jobs:
            rname = next(iter(spec))
            local = build_reward(rname, device=args.device, batch_size=args.batch, **spec[rname]) \
                if rname != "shapes" else build_reward(rname, batch_size=args.batch, **spec[rname])
            res = _measure(label, local, images, prompts, args.repeats)
            rows.append({"reward": label, "mode": "in-process", "batch": args.batch, "image_px": px, **res})
            del local
            cfg = root / f"{rname}.json"
            cfg.write_text(json.dumps({"rewards": spec}))
            proc, url = _start_server(cfg, args.device, args.threads)
            try:
                remote = RemoteReward(url=url, reward=rname, batch_size=args.batch, timeout_s=600)
                res_r = _measure(label, remote, images, prompts, args.repeats)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.append({"reward": label, "mode": "remote (loopback)", "batch": args.batch, "image_px": px, **res_r,
                         "remote_over_local": res["images_per_s"] / res_r["images_per_s"]})
    meta = {**machine(), "device": args.device, "batch": args.batch, "threads": args.threads, "notes": notes}
    md = write_results("rewards", rows, ["reward", "mode", "batch", "image_px", "images_per_s", "ms_per_image",
                                         "remote_over_local"], meta)
    print(md.read_text())
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
