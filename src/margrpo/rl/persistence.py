"""Checkpoints of a training run: safetensors in one process, `torch.distributed.checkpoint` in several.

A mixin of `Trainer` (`rl/trainer.py`): it reads the trainer's policy, optimizer, EMA, reward guard and fault
counter, and writes them so that a resumed run continues exactly as an uninterrupted one (in any world size).
"""

from __future__ import annotations

import sys
from pathlib import Path

from margrpo.models.loading import copy_policy_tensors
from margrpo.rl import distributed as D
from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from margrpo.utils.tensor_state import optimizer_state_from_tensors, optimizer_state_to_tensors

KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is damaged (and `_protected`)


class CheckpointMixin:
    """`save(step)` and `restore()` for `Trainer`."""

    def _state(self) -> dict:
        return {"model": self.cfg.model, "bad_steps": self.bad_steps,
                "reward_guard": {"total": self.guard.total, "invalid": self.guard.invalid},
                "last_within_bounds": self.last_within_bounds}

    def _protected(self) -> tuple[int, ...]:
        """The checkpoint pruning must keep: that of the last evaluation within the monitors' bounds."""
        return (self.last_within_bounds,) if self.last_within_bounds is not None else ()

    def _dcp_state(self) -> dict:
        """The trainable weights and optimizer state keyed by parameter name (not by rank or shard), the form
        `torch.distributed.checkpoint` reshards on load: the same for DDP, FSDP2 and one process."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.policy, self.opt, options=StateDictOptions(ignore_frozen_params=True))
        state = {"model": model, "optim": optim}
        if self.ema is not None:
            state["ema"] = self.ema.shadow
        return state

    def _save_distributed(self, step: int) -> Path:
        """Every rank writes its part through DCP into a hidden folder; rank 0 then commits it atomically, with
        state.json and a manifest, as `checkpoints/step-N/dcp/` (`save_checkpoint(extra_dirs=...)`)."""
        import shutil

        import torch.distributed.checkpoint as dcp

        root = self.out / "checkpoints"
        tmp = root / f".dcp-step-{step}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save of this step
        D.barrier()
        dcp.save(self._dcp_state(), checkpoint_id=str(tmp))
        D.barrier()
        final = root / f"step-{step}"
        if self.rank == 0:
            save_checkpoint(self.out, step, {}, {**self._state(), "dcp": True, "world_size": self.world,
                                                 "rollout_shards": self.shards},
                            keep_last=KEEP_CHECKPOINTS, extra_dirs={"dcp": tmp}, protect=self._protected())
        D.barrier()
        return final

    def save(self, step: int) -> Path:
        """A checkpoint of step `step`: safetensors in one process, `torch.distributed.checkpoint` in several.

        Both resume in any world size: a DCP one is resharded on load (also into one process), a safetensors one
        holds full tensors that every DDP replica reads."""
        if self.world > 1:
            return self._save_distributed(step)
        tens, meta = optimizer_state_to_tensors(self.opt.state_dict())
        groups = {"policy": {n: p.detach() for n, p in self.params}, "optimizer": tens}
        if self.ema is not None:
            groups["ema"] = self.ema.shadow
        a = self.cfg.algorithm
        lora = ({"rank": a.lora_rank, "alpha": a.lora_alpha, "target_modules": self.lora_targets}
                if self.lora else None)  # what `load_model(run_dir)` needs to rebuild the adapters
        return save_checkpoint(self.out, step, groups, {**self._state(), "optimizer": meta, "lora": lora},
                               keep_last=KEEP_CHECKPOINTS, protect=self._protected())

    def restore(self) -> int:
        """Load the newest checkpoint whose files match their manifest; damaged newer ones are reported and skipped
        (the run then repeats their steps, with the same result, since every step is a function of the seed)."""
        skipped: list[str] = []
        ckpt = latest_checkpoint(self.out, verify=True, skipped=skipped)
        for problem in skipped:
            print(f"resume: skipping a damaged checkpoint: {problem}", file=sys.stderr)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no complete, undamaged checkpoint under {self.out / 'checkpoints'}"
                                    + (f" ({len(skipped)} damaged)" if skipped else ""))
        tensors, state = load_checkpoint(ckpt, device=self.device, verify=False)  # latest_checkpoint verified it
        if state.get("dcp"):
            self._restore_distributed(ckpt)
        else:
            self._restore_tensors(ckpt, tensors, state)
        self.bad_steps = int(state.get("bad_steps", 0))  # restored: a resume after a crash must not change the run
        if self.bad_steps >= self.cfg.faults.max_consecutive:  # the run stopped for them: the user changed something
            self.bad_steps = 0
        self.guard.total = int(state["reward_guard"]["total"])
        self.guard.invalid = int(state["reward_guard"]["invalid"])
        # absent from checkpoints older than the monitors; dropped when the run goes on without monitors.stop
        self.last_within_bounds = state.get("last_within_bounds") if self.cfg.monitors.stop else None
        return int(state["step"])

    def _restore_distributed(self, ckpt: Path) -> None:
        """Load a DCP checkpoint into this run's layout, whatever world size wrote it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
        # not strict: the frozen parameters (the head under train=ar) are not in a checkpoint, they come from the base
        # model; every trainable one is, or dcp.load above would have refused
        set_state_dict(self.policy, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        if self.ema is not None:
            self.ema.shadow = state["ema"]

    def _restore_tensors(self, ckpt: Path, tensors: dict, state: dict) -> None:
        """Load a single-process (safetensors) checkpoint: full tensors, read by every DDP replica alike."""
        if self.fsdp:
            raise ValueError(f"{ckpt} is a single-process checkpoint; resume it with distributed.strategy=ddp (or "
                             "in one process), whose checkpoints FSDP2 runs can resume")
        named = dict(self.params)
        missing = set(named) - set(tensors["policy"])
        if missing:
            raise ValueError(f"{ckpt}: checkpoint lacks trainable tensors {sorted(missing)[:5]} "
                             "(was it written with another algorithm.train setting?)")
        copy_policy_tensors(named, {n: tensors["policy"][n] for n in named}, str(ckpt))
        self.opt.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"]))
        if self.ema is not None:
            if "ema" not in tensors:
                raise ValueError(f"{ckpt}: eval.ema_decay > 0 but the checkpoint holds no EMA weights (the run was "
                                 "started without one; resume with eval.ema_decay=0)")
            copy_policy_tensors(self.ema.shadow, {n: tensors["ema"][n] for n in self.ema.shadow}, f"{ckpt} (EMA)")
