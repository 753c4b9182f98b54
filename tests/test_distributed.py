"""Multi-process training under torchrun (CPU, gloo): two processes train the weights one process trains on the same
global batch, for DDP and FSDP2, and checkpoints cross world sizes in both directions.

Every run here is tiny (the `conftest.tiny_model`, 2 groups of 4 images, 4 AR steps) and single-threaded per
process; the whole file takes about a minute and a half on a 2-core machine.

Why the comparison can be exact up to float rounding: with `distributed.rollout_shards=2` the global batch is
drawn as two shards with their own random streams, whether one process draws both or each of two processes draws
one (`rl/distributed.py`); the rewards are gathered so the advantages are the global batch's, and the policy terms
are weighed so that the averaged gradient is the one-process gradient (`rl.loss.PolicyNorm`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from margrpo.rl.config import TrainConfig
from margrpo.rl.trainer import Trainer
from margrpo.utils.config import load_config

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_worker.py")
OPTIONS = ["rewards={colour_fraction: 1.0}", "algorithm.prompts_per_step=2", "algorithm.group_size=4",
           "sampling.ar_steps=4", "sampling.diffusion_steps=6", "algorithm.head_steps_per_ar_step=2",
           "algorithm.ppo_epochs=2", "log.checkpoint_every=2", "log.sample_every=100", "log.tensorboard=false",
           "optim.lr=3e-3", "distributed.rollout_shards=2"]
# Tolerance of 1 vs 2 processes. The two differ only in float32 rounding: the transformer runs batches of 8 vs 4
# rows (other matmul blockings), the gloo all-reduce sums in another order, and the reward statistics are gathered.
# Adam normalises each update to about lr = 3e-3 per step whatever the gradient's scale, so rounding in the
# gradient moves a weight by a small fraction of lr: measured max |difference| ~5e-6 after 2 steps and ~8e-6
# after 4 (with a resume between). 1e-4 is ~3% of one step, while training moves the weights by >1e-2 (checked).
ATOL = 1e-4


def _torchrun(model_dir: Path, out: Path, steps: int, resume: bool, *extra: str) -> None:
    """`torchrun --standalone --nproc_per_node=2 tests/dist_worker.py ...` (torchrun is torch.distributed.run)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(model_dir), str(out), str(steps), "1" if resume else "0", *OPTIONS, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _one_process(model_dir: Path, out: Path, steps: int, resume: bool = False, extra: tuple[str, ...] = ()) -> None:
    cfg = load_config(TrainConfig, None, [f"model={model_dir}", f"out_dir={out}", f"steps={steps}", *OPTIONS,
                                          *extra])
    Trainer(cfg, progress=False).run(resume=resume)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The base model and a one-process run of 4 steps (checkpoints at 2 and 4: the weights to match)."""
    root = tmp_path_factory.mktemp("dist")
    tiny_model().save_pretrained(root / "model")
    _one_process(root / "model", root / "one", 4)
    return root


def _trained(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The trainable weights of a one-process checkpoint, or (step None) those of the exported model."""
    if step is not None:
        return load_file(str(run / "checkpoints" / f"step-{step}" / "policy.safetensors"))
    return load_file(str(run / "model" / "model.safetensors"))


BATCH_STD = ("algorithm.advantage_std=batch", "algorithm.normalize=rollout", "algorithm.update=ar_step",
             "algorithm.ptx_weight=1.0", "algorithm.ptx_batch_size=8")
# SGD: an update proportional to the gradient, so a policy weight or ptx gradient of the wrong scale shows (Adam's
# first steps are about lr x sign(gradient) and would hide it), no clipping, and a tolerance to match: measured
# 1.2e-7 apart with 0.14 moved; unweighted ranks' policy terms give 2.5e-5, a ptx gradient not averaged 0.048.
SGD_ATOL = 2e-6
MTE_SGD = ("algorithm.mte_k=2", "optim.name=sgd", "optim.lr=0.5", "optim.grad_clip=0")
MTE_SGD_PTX = (*MTE_SGD, "algorithm.ptx_weight=1.0", "algorithm.ptx_batch_size=8")  # FSDP2 refuses ptx


@pytest.mark.parametrize(("strategy", "extra"), [("ddp", ()), ("fsdp", ()), ("ddp", BATCH_STD),
                                                 ("ddp", MTE_SGD_PTX), ("fsdp", MTE_SGD)],
                         ids=["ddp", "fsdp", "ddp-batch-std-rollout-norm-ar-step-ptx", "ddp-mte-sgd-ptx",
                              "fsdp-mte-sgd"])
def test_two_processes_train_the_weights_of_one_on_the_same_global_batch(runs, tmp_path, strategy, extra):
    """The batch-std case checks the gathered advantages, the global pair count of normalize=rollout, one
    optimizer step per scored AR step (no accumulation) and the ptx term (its batch cut into the shards' parts,
    its gradient averaged outside DDP's reducer); the MTE cases the kept-count weights of the MTE chains' terms
    (the trajectory loss takes its head gradients with autograd.grad inside DDP's and FSDP2's forward), and under
    DDP the ptx term beside no_sync accumulation over AR steps, under SGD; the others the kept-count weights
    and no_sync."""
    one = runs / "one"
    if extra:
        one = tmp_path / "one"
        _one_process(runs / "model", one, 2, extra=extra)
    name = strategy + {(): "", BATCH_STD: "-batch", MTE_SGD_PTX: "-mte-ptx", MTE_SGD: "-mte"}[extra]
    _torchrun(runs / "model", runs / name, 2, False, f"distributed.strategy={strategy}", *extra)
    want = _trained(one, 2)
    got = {k: v for k, v in _trained(runs / name).items() if k in want}
    base = {k: v for k, v in load_file(str(runs / "model" / "model.safetensors")).items() if k in want}
    moved, diff = _max_difference(want, base), _max_difference(want, got)
    print(f"{name}: max |1 process - 2 processes| = {diff:.3g}, max weight change = {moved:.3g}")
    assert moved > 100 * ATOL  # the comparison is not vacuous
    assert diff < (SGD_ATOL if "optim.name=sgd" in extra else ATOL)
    # only rank 0 wrote: one metrics file with one row per step, and a DCP checkpoint sharded by both ranks
    rows = (runs / name / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    dcp_files = sorted(p.name for p in (runs / name / "checkpoints" / "step-2" / "dcp").iterdir())
    assert ".metadata" in dcp_files and len(dcp_files) >= 2
    # the reward statistics and zero-signal counts are those of the global batch
    import json

    ones = [json.loads(r) for r in (one / "metrics.jsonl").read_text().splitlines()][:2]
    twos = [json.loads(r) for r in rows]
    for a, b in zip(ones, twos, strict=True):
        for k in ("reward/mean", "reward/std", "zero_signal_fraction", "advantage/abs_max", "reward/invalid_count"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        assert a["elements"] == b["elements"]
        if "algorithm.ptx_weight=1.0" in extra:  # the pretraining term ran on both sides, on the same images
            assert a["loss/ptx"] == pytest.approx(b["loss/ptx"], rel=1e-4)


def test_a_two_process_checkpoint_resumes_in_one_process_and_the_reverse(runs, tmp_path):
    want = _trained(runs / "one", 4)
    # 2 -> 1: an FSDP2 run's DCP checkpoint of step 2, resharded into one process for steps 3-4
    if (runs / "fsdp" / "checkpoints" / "step-2").is_dir():  # written by the test above
        shutil.copytree(runs / "fsdp", tmp_path / "two-one")
    else:
        _torchrun(runs / "model", tmp_path / "two-one", 2, False, "distributed.strategy=fsdp")
    _one_process(runs / "model", tmp_path / "two-one", 4, resume=True)
    assert (tmp_path / "two-one" / "checkpoints" / "step-4" / "policy.safetensors").is_file()
    diff = _max_difference(want, _trained(tmp_path / "two-one", 4))
    print(f"2 -> 1 processes: max difference {diff:.3g}")
    assert diff < ATOL
    # 1 -> 2: a one-process (safetensors) checkpoint of step 2, read by both DDP replicas for steps 3-4
    _one_process(runs / "model", tmp_path / "one-two", 2)
    _torchrun(runs / "model", tmp_path / "one-two", 4, True, "distributed.strategy=ddp")
    assert (tmp_path / "one-two" / "checkpoints" / "step-4" / "dcp").is_dir()
    got = {k: v for k, v in _trained(tmp_path / "one-two").items() if k in want}
    diff = _max_difference(want, got)
    print(f"1 -> 2 processes: max difference {diff:.3g}")
    assert diff < ATOL


def test_rollout_shards_must_split_the_batch_into_whole_groups_per_process(runs, tmp_path):
    cfg = load_config(TrainConfig, None, [f"model={runs / 'model'}", f"out_dir={tmp_path}", "steps=1", *OPTIONS,
                                          "distributed.rollout_shards=3"])
    with pytest.raises(ValueError, match="rollout_shards"):
        Trainer(cfg, progress=False)


def test_a_committed_dcp_folder_is_in_the_manifest_and_a_damaged_file_is_found(tmp_path):
    """`save_checkpoint(extra_dirs=...)` moves the ranks' DCP folder in before the atomic rename and hashes its
    files, so resuming skips a distributed checkpoint with a truncated shard as it does a safetensors one."""
    from margrpo.utils.checkpoint import latest_checkpoint, save_checkpoint, verify_checkpoint

    for step in (1, 2):
        d = tmp_path / f".dcp-{step}"
        d.mkdir()
        (d / ".metadata").write_bytes(b"meta")
        (d / "__0_0.distcp").write_bytes(b"shard zero" * 10)
        ckpt = save_checkpoint(tmp_path, step, {}, {"dcp": True}, extra_dirs={"dcp": d})
        assert not d.exists() and (ckpt / "dcp" / "__0_0.distcp").is_file()
        assert verify_checkpoint(ckpt) is None
    shard = tmp_path / "checkpoints" / "step-2" / "dcp" / "__0_0.distcp"
    shard.write_bytes(b"shard")
    assert "__0_0.distcp" in verify_checkpoint(shard.parent.parent)
    assert latest_checkpoint(tmp_path, verify=True).name == "step-1"
