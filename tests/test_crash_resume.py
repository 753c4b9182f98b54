"""Crash safety with real processes and real signals: SIGKILL at random moments, then `--resume`, ends bit-identical
to an uninterrupted run; SIGTERM finishes the step, writes a checkpoint and exits with a message saying how to resume.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from margrpo.utils.checkpoint import latest_checkpoint

from conftest import tiny_model

STEPS = 8


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    tiny_model().save_pretrained(root / "model")
    cfg = root / "train.yaml"
    cfg.write_text(f"""model: {root / 'model'}
steps: {STEPS}
rewards: {{colour_fraction: 1.0}}
threads: 1
sampling: {{ar_steps: 4, diffusion_steps: 6}}
algorithm: {{prompts_per_step: 2, group_size: 4, head_steps_per_ar_step: 2, ppo_epochs: 2}}
optim: {{lr: 3.0e-3}}
log: {{checkpoint_every: 1, sample_every: 1000, tensorboard: false}}
""")
    return cfg


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "margrpo.cli", "train", *args, "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _metric_lines(run: Path) -> int:
    f = run / "metrics.jsonl"
    return f.read_text().count("\n") if f.is_file() else 0


def _final_policy(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run, verify=True)
    assert ckpt is not None and ckpt.name == f"step-{STEPS}"
    return load_file(str(ckpt / "policy.safetensors"))


def _args(config_file: Path, run: Path) -> list[str]:
    if latest_checkpoint(run, verify=True) is not None:
        return ["--resume", str(run)]
    return [str(config_file), f"out_dir={run}"]


def test_sigkill_at_random_moments_then_resume_is_bit_identical(config_file, tmp_path):
    full = tmp_path / "full"
    p = _start([str(config_file), f"out_dir={full}"])
    assert p.wait(timeout=300) == 0, p.stderr.read()

    run = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        p = _start(_args(config_file, run))
        target = _metric_lines(run) + rng.randint(1, 2)
        deadline = time.monotonic() + 120
        while _metric_lines(run) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next step: sampling, the update or a checkpoint write
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
    assert kills >= 2
    p = _start(_args(config_file, run))
    assert p.wait(timeout=300) == 0, p.stderr.read()
    want, got = _final_policy(full), _final_policy(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (run / "metrics.jsonl").read_text().count("\n") == STEPS


def test_sigterm_finishes_the_step_checkpoints_and_says_how_to_resume(config_file, tmp_path):
    run = tmp_path / "term"
    p = _start([str(config_file), f"out_dir={run}"])
    deadline = time.monotonic() + 120
    while _metric_lines(run) < 2 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert rc == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and f"--resume {run}" in err and "Traceback" not in err
    stopped = latest_checkpoint(run, verify=True)
    assert stopped is not None and int(stopped.name.split("-")[1]) == _metric_lines(run) < STEPS
    p = _start(["--resume", str(run)])
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert latest_checkpoint(run).name == f"step-{STEPS}"
