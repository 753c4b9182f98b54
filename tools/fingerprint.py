"""Fingerprint the training and evaluation paths: a refactor that must not change results must not change this.

`python tools/fingerprint.py OUT.json` trains every shipped preset (on the demo's settings) for two steps, plus
the positive control, the null control, a guided rollout and a resumed run, evaluates the result on a few
held-out prompts, and writes the SHA-256 of the final weights, of the logged metrics (timings left out) and of the
evaluation images. Two checkouts print equal digests iff their training and sampling arithmetic agree bit for bit
on this machine (the digests depend on the CPU and the torch build, so compare runs on one machine only).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import torch

from margrpo.configs import config_path
from margrpo.rl.config import TrainConfig
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config

try:
    from margrpo.worlds.shapes.evaluate import eval_prompt_set, evaluate
except ImportError:  # before issue #14's layout
    from margrpo.evaluate import eval_prompt_set, evaluate


def trained_model(trainer: Trainer):
    return trainer.model if hasattr(trainer, "model") else trainer.gen  # `gen` before issue #14


def eval_sampler(cfg: TrainConfig):
    """The evaluation's sampler settings: the `sampling:` section itself since issue #25, a view of it before."""
    return cfg.eval_sampler() if hasattr(cfg, "eval_sampler") else cfg.sampling


# the guidance scale's config key (`sampling.cfg` before the renames of issue #14), so old checkouts run this too
GUIDANCE_KEY = "guidance_scale" if "guidance_scale" in {f.name for f in fields(TrainConfig().sampling)} else "cfg"
COMMON = ["steps=2", "log.sample_every=100", "log.checkpoint_every=1", "log.tensorboard=false", "threads=1",
          "algorithm.prompts_per_step=2", "algorithm.group_size=4",
          # pinned, so that a change of demo.yaml's recipe (2026-12-07: temperature 0.5, unknown tokens) does not
          # change every digest; presets set their own policy_tokens after these
          "sampling.temperature=1.0"]
CASES = {
    "demo": [],
    **{p: [f"@presets/{p}.yaml"] for p in ("grpo", "mar-grpo", "mar-grpo-matching", "nft", "mar-grpo-nft",
                                            "reference")},
    "control": ["@presets/grpo.yaml", "rewards={colour_fraction: 1.0}", "prompts.fixed=[a red square]",
                "algorithm.prompts_per_step=1", "algorithm.ar_step_fraction=1.0", "optim.name=adamw"],
    "null": ["@presets/mar-grpo.yaml", "rewards={random: 1.0, shapes: 0.0}"],
    "guided": ["@presets/mar-grpo.yaml", f"sampling.{GUIDANCE_KEY}=2.0"],
    "eval-loop": ["eval.every=2", "eval.per_category=2", "eval.ema_decay=0.9", "eval.in_distribution=true"],
}


def old_name(key: str) -> str:
    """The parameter's name before issue #25 renamed the image model's `tokenizer` to `codec`."""
    return "tokenizer." + key[len("codec."):] if key.startswith("codec.") else key


def digest_tensors(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    named = {old_name(k): v for k, v in tensors.items()}
    for k in sorted(named):
        h.update(k.encode())
        h.update(named[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def digest_metrics(path: Path) -> str:
    """The logged metrics less timings and the reward-hacking monitors' `monitor/*` (measurements of the evaluation
    images, whose own digest is `eval`; absent before the monitors, so old and new checkouts compare equal)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keep = [{k: v for k, v in r.items() if not k.startswith("monitor/")
             and not any(s in k for s in ("time", "sec", "per_s", "_s", "rss", "memory"))} for r in rows]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def run_case(name: str, extra: list[str], root: Path) -> dict[str, str]:
    files = [config_path("demo.yaml")] + [config_path(e[1:]) for e in extra if e.startswith("@")]
    ov = [*COMMON, f"out_dir={root / name}", *[e for e in extra if not e.startswith("@")]]
    cfg = load_config(TrainConfig, files, ov)
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    out = {"weights": digest_tensors(dict(trained_model(trainer).state_dict())),
           "metrics": digest_metrics(root / name / "metrics.jsonl")}
    res = evaluate(trained_model(trainer), eval_prompt_set(1), eval_sampler(cfg), seed=5, progress=False)
    out["eval"] = hashlib.sha256(res.images.float().numpy().tobytes()).hexdigest()[:16]
    if name == "demo":  # resume: a third step after a restart equals a run of three
        cfg3 = load_config(TrainConfig, files, [*ov, "steps=3"])
        t3 = Trainer(cfg3, progress=False)
        t3.run(resume=True)
        out["resumed"] = digest_tensors(dict(trained_model(t3).state_dict()))
    return out


def base_eval() -> dict[str, str]:
    """The shipped base as loaded (no training), sampled on a few held-out prompts: the demo's "before"."""
    try:
        from margrpo.models.loading import load_model
    except ImportError:  # before issue #14's layout
        from margrpo.rl.trainer import load_model
    cfg = load_config(TrainConfig, config_path("demo.yaml"), [])
    res = evaluate(load_model(cfg.model, "cpu"), eval_prompt_set(2), eval_sampler(cfg), seed=5, progress=False)
    return {"eval": hashlib.sha256(res.images.float().numpy().tobytes()).hexdigest()[:16],
            "strict": str(res.summary["overall"]["strict"])}


def main() -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    result = {"base-eval": base_eval()}
    print("base-eval", result["base-eval"], flush=True)
    for name, extra in CASES.items():
        result[name] = run_case(name, extra, root)
        print(name, result[name], flush=True)
    shutil.rmtree(root)
    Path(sys.argv[1]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
