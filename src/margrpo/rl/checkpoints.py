"""What a training run carries from step to step (`TrainingState`: built by `create`), and its checkpoints:
safetensors in one process, `torch.distributed.checkpoint` in several.

`save` and `restore` write and read the state so that a resumed run continues exactly as an uninterrupted one, in
any world size; `TrainingState.snapshot` / `put_back` undo a step that turned out bad (docs/failures.md).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from margrpo.models.base import ImageModel
from margrpo.models.loading import copy_policy_tensors
from margrpo.rewards.base import RewardFailureGuard
from margrpo.rl import distributed as D
from margrpo.rl.config import TrainConfig
from margrpo.rl.eval_loop import ParameterEMA
from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from margrpo.utils.rng import make_generator
from margrpo.utils.tensor_state import optimizer_state_from_tensors, optimizer_state_to_tensors

KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest is damaged (and `protected`)


@dataclass
class TrainingState:
    """The trainable weights and their optimizer, the EMA of the weights, the reward guard's counts, the count of
    bad steps in a row and the last evaluation within the monitors' bounds: everything a step changes that a
    checkpoint must hold."""

    policy: nn.Module  # the module the optimizer's parameters belong to (DDP / FSDP2's in several processes)
    params: list[tuple[str, nn.Parameter]]
    opt: torch.optim.Optimizer
    ema: ParameterEMA | None
    guard: RewardFailureGuard
    model_spec: str  # the config's `model`, written beside the weights
    lora: dict | None = None  # rank, alpha and target modules: what `load_model(run_dir)` needs to rebuild adapters
    bad_steps: int = 0
    last_within_bounds: int | None = None  # monitors.stop: the step of the checkpoint a drift returns to

    @classmethod
    def create(cls, cfg: TrainConfig, model: ImageModel, dist: D.DistContext) -> TrainingState:
        """The trainable parameters of `model` (LoRA adapters injected first under `train: lora`, drawn from the
        run's generator: the same on every rank), the policy module the processes share (DDP / FSDP2; the policy
        itself in one process), the optimizer, the EMA and the reward guard."""
        a, o = cfg.algorithm, cfg.optim
        lora = None
        if a.train == "lora":
            from margrpo.models.lora import add_lora

            lora = {"rank": a.lora_rank, "alpha": a.lora_alpha, "target_modules": model.policy.lora_target_modules()}
            add_lora(model.policy, a.lora_rank, a.lora_alpha, lora["target_modules"],
                     make_generator(cfg.seed, "lora", 0, device=dist.device))
        params = model.trainable_parameters(a.train)
        policy = model.policy
        if dist.world > 1:
            policy = D.wrap_policy(model.policy, cfg.distributed.strategy, dist)
            if cfg.distributed.strategy == "fsdp":  # fully_shard swapped in sharded parameters: the optimizer's
                named = dict(model.named_parameters())
                params = [(n, named[n]) for n, _ in params]
        if o.name == "sgd":
            opt = torch.optim.SGD([p for _, p in params], lr=o.lr, momentum=o.beta1)
        else:
            opt = torch.optim.AdamW([p for _, p in params], lr=o.lr, betas=(o.beta1, 0.999), weight_decay=0.0)
        ema = ParameterEMA(params, cfg.eval.ema_decay) if cfg.eval.ema_decay > 0 else None
        return cls(policy=policy, params=params, opt=opt, ema=ema, model_spec=cfg.model, lora=lora,
                   guard=RewardFailureGuard(cfg.max_reward_failure_fraction, min_samples=64))

    def snapshot(self) -> tuple[dict, dict, dict | None]:
        """Trainable weights, optimizer state and EMA, to put back when a step turns out bad."""
        params = {n: p.detach().clone() for n, p in self.params}
        opt = copy.deepcopy(self.opt.state_dict())
        ema = {n: t.clone() for n, t in self.ema.shadow.items()} if self.ema is not None else None
        return params, opt, ema

    def put_back(self, snap: tuple[dict, dict, dict | None]) -> None:
        params, opt, ema = snap
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(params[n])
        self.opt.load_state_dict(opt)
        self.opt.zero_grad(set_to_none=True)
        if ema is not None:
            self.ema.shadow = ema

    def counters(self) -> dict:
        return {"model": self.model_spec, "bad_steps": self.bad_steps,
                "reward_guard": {"total": self.guard.total, "invalid": self.guard.invalid},
                "last_within_bounds": self.last_within_bounds}

    def protected(self) -> tuple[int, ...]:
        """The checkpoint pruning must keep: that of the last evaluation within the monitors' bounds."""
        return (self.last_within_bounds,) if self.last_within_bounds is not None else ()


def save(out: Path, step: int, state: TrainingState, dist: D.DistContext, shards: int) -> Path:
    """A checkpoint of step `step`: safetensors in one process, `torch.distributed.checkpoint` in several.

    Both resume in any world size: a DCP one is resharded on load (also into one process), a safetensors one holds
    full tensors that every DDP replica reads."""
    if dist.world > 1:
        return _save_distributed(out, step, state, dist, shards)
    tens, meta = optimizer_state_to_tensors(state.opt.state_dict())
    groups = {"policy": {n: p.detach() for n, p in state.params}, "optimizer": tens}
    if state.ema is not None:
        groups["ema"] = state.ema.shadow
    return save_checkpoint(out, step, groups, {**state.counters(), "optimizer": meta, "lora": state.lora},
                           keep_last=KEEP_CHECKPOINTS, protect=state.protected())


def _dcp_state(state: TrainingState) -> dict:
    """The trainable weights and optimizer state keyed by parameter name (not by rank or shard), the form
    `torch.distributed.checkpoint` reshards on load: the same for DDP, FSDP2 and one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(state.policy, state.opt, options=StateDictOptions(ignore_frozen_params=True))
    out = {"model": model, "optim": optim}
    if state.ema is not None:
        out["ema"] = state.ema.shadow
    return out


def _save_distributed(out: Path, step: int, state: TrainingState, dist: D.DistContext, shards: int) -> Path:
    """Every rank writes its part through DCP into a hidden folder; rank 0 then commits it atomically, with
    state.json and a manifest, as `checkpoints/step-N/dcp/` (`save_checkpoint(extra_dirs=...)`)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    root = out / "checkpoints"
    tmp = root / f".dcp-step-{step}"
    if dist.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save of this step
    D.barrier()
    dcp.save(_dcp_state(state), checkpoint_id=str(tmp))
    D.barrier()
    final = root / f"step-{step}"
    if dist.rank == 0:
        save_checkpoint(out, step, {}, {**state.counters(), "dcp": True, "world_size": dist.world,
                                        "rollout_shards": shards},
                        keep_last=KEEP_CHECKPOINTS, extra_dirs={"dcp": tmp}, protect=state.protected())
    D.barrier()
    return final


def restore(out: Path, state: TrainingState, device: torch.device, fsdp: bool, max_bad_steps: int,
            keep_within_bounds: bool = False) -> int:
    """Load the newest checkpoint whose files match their manifest into `state`; returns its step. Damaged newer ones
    are reported and skipped (the run then repeats their steps, with the same result, since every step is a
    function of the seed). `keep_within_bounds` (`monitors.stop`): keep the checkpoint's last evaluation within the
    monitors' bounds (dropped when the run goes on without monitors.stop)."""
    skipped: list[str] = []
    ckpt = latest_checkpoint(out, verify=True, skipped=skipped)
    for problem in skipped:
        print(f"resume: skipping a damaged checkpoint: {problem}", file=sys.stderr)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no complete, undamaged checkpoint under {out / 'checkpoints'}"
                                + (f" ({len(skipped)} damaged)" if skipped else ""))
    tensors, meta = load_checkpoint(ckpt, device=device, verify=False)  # latest_checkpoint verified it
    if meta.get("dcp"):
        _restore_distributed(ckpt, state)
    else:
        _restore_tensors(ckpt, tensors, meta, state, fsdp)
    state.bad_steps = int(meta.get("bad_steps", 0))  # restored: a resume after a crash must not change the run
    if state.bad_steps >= max_bad_steps:  # the run stopped for them: the user changed something
        state.bad_steps = 0
    state.guard.total = int(meta["reward_guard"]["total"])
    state.guard.invalid = int(meta["reward_guard"]["invalid"])
    # absent from checkpoints older than the monitors
    state.last_within_bounds = meta.get("last_within_bounds") if keep_within_bounds else None
    return int(meta["step"])


def _restore_distributed(ckpt: Path, state: TrainingState) -> None:
    """Load a DCP checkpoint into this run's layout, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    loaded = _dcp_state(state)
    dcp.load(loaded, checkpoint_id=str(ckpt / "dcp"))
    # not strict: the frozen parameters (the head under train=ar) are not in a checkpoint, they come from the base
    # model; every trainable one is, or dcp.load above would have refused
    set_state_dict(state.policy, state.opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    if state.ema is not None:
        state.ema.shadow = loaded["ema"]


def _restore_tensors(ckpt: Path, tensors: dict, meta: dict, state: TrainingState, fsdp: bool) -> None:
    """Load a single-process (safetensors) checkpoint: full tensors, read by every DDP replica alike."""
    if fsdp:
        raise ValueError(f"{ckpt} is a single-process checkpoint; resume it with distributed.strategy=ddp (or "
                         "in one process), whose checkpoints FSDP2 runs can resume")
    named = dict(state.params)
    missing = set(named) - set(tensors["policy"])
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks trainable tensors {sorted(missing)[:5]} "
                         "(was it written with another algorithm.train setting?)")
    copy_policy_tensors(named, {n: tensors["policy"][n] for n in named}, str(ckpt))
    state.opt.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], meta["optimizer"]))
    if state.ema is not None:
        if "ema" not in tensors:
            raise ValueError(f"{ckpt}: eval.ema_decay > 0 but the checkpoint holds no EMA weights (the run was "
                             "started without one; resume with eval.ema_decay=0)")
        copy_policy_tensors(state.ema.shadow, {n: tensors["ema"][n] for n in state.ema.shadow}, f"{ckpt} (EMA)")
