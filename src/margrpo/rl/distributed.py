"""Multi-process training with PyTorch's own engine: `torchrun` starts the processes, this module joins them.

Why it is built this way:

- **No home-made process management.** `torchrun --nproc_per_node=N -m margrpo.cli train ...` sets RANK,
  WORLD_SIZE, MASTER_ADDR, ...; `init_from_env` only calls `init_process_group` from those (gloo on CPU, nccl on
  CUDA). A run with WORLD_SIZE unset or 1 never touches `torch.distributed`.
- **The global batch is cut into shards, not into ranks.** A rollout of `prompts_per_step` groups is drawn as
  `distributed.rollout_shards` shards of whole groups (group advantages stay local); shard k draws its prompts and
  noise from streams keyed by k. A process draws the shards it owns, so with a fixed shard count the run is the
  same whatever the number of processes (one process draws every shard), and a checkpoint resumes under another
  world size with the same continuation.
- **What one process would see, everyone sees.** Rewards (scores, validity, parts, reasons, categories) are
  all-gathered, so the batch-std advantages, the zero-signal count, the reward statistics and the reward-failure
  guard are those of the global batch on every rank; the guard raises on every rank at once (no rank is left
  waiting in a collective).
- **Gradients are the one-process gradients.** DDP and FSDP2 average gradients over ranks; the trainer weighs
  each rank's policy term so that the average is the mean over the global batch's kept elements (not the mean
  of the per-rank means), see `Trainer.train_step`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from margrpo.rl.config import TrainConfig

STRATEGIES = ("ddp", "fsdp")
SUMMED_STATS = ("elements",)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, the device it computes on."""

    rank: int
    world: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world > 1


def check_shards(cfg: TrainConfig, world: int) -> int:
    """The number of rollout shards; refuses what a multi-process run does not support (yet)."""
    a = cfg.algorithm
    shards = cfg.distributed.rollout_shards or world
    if shards % world or a.prompts_per_step % shards:
        raise ValueError(f"distributed.rollout_shards={shards} must be a multiple of the world size {world} and divide "
                         f"algorithm.prompts_per_step={a.prompts_per_step} (whole groups per shard, equal shards per "
                         "process)")
    if a.ptx_weight > 0 and a.ptx_batch_size % shards:
        raise ValueError(f"algorithm.ptx_batch_size={a.ptx_batch_size} must be a multiple of the rollout shards "
                         f"({shards}): each shard's ptx images are an equal part of the batch")
    if world > 1 and cfg.distributed.strategy == "fsdp":
        if cfg.eval.every > 0 or cfg.eval.ema_decay > 0:
            raise ValueError("distributed.strategy=fsdp: in-loop evaluation and the EMA are not supported yet "
                             "(set eval.every=0 and eval.ema_decay=0, or use strategy=ddp)")
        if a.ptx_weight > 0:
            raise ValueError("distributed.strategy=fsdp: algorithm.ptx_weight > 0 is not supported yet (its "
                             "loss runs outside the sharded module's forward; use strategy=ddp or ptx_weight: 0)")
    return shards


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> DistContext:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or stay a single process.

    `device` is the config's: "cuda" becomes this process's local GPU (LOCAL_RANK); an explicit "cuda:k" is kept.
    """
    world = env_world_size()
    dev = torch.device(device)
    if world <= 1:
        return DistContext(0, 1, dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), dev)


class PolicyDDP(nn.parallel.DistributedDataParallel):
    """DDP whose wrapper also exposes the policy's members (`head`, `mask_schedule`, `seq_len`, ...).

    The sampler and replay take a `Policy` and call it; handing them this wrapper makes their forward go through
    DDP's call (so its reducer knows a backward follows) while everything else reads the wrapped policy's.
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_policy(policy: nn.Module, strategy: str, ctx: DistContext) -> nn.Module:
    """The policy as the processes share it: DDP (a replica per rank) or FSDP2 (parameters sharded).

    FSDP2 shards the head as its own unit first: the sampler calls the head module directly, and its
    parameters must be gathered around that call too. Frozen parameters (a frozen head) get no gradients, so
    neither gradient buffers nor optimizer state.
    """
    if strategy == "ddp":
        # broadcast_buffers off: the policy's buffers never change, and a broadcast in every forward would make
        # rank-local forwards (rank 0's sample grids) collectives.
        import inspect

        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return PolicyDDP(policy, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **sync)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(policy.head)
        fully_shard(policy)
        return policy
    raise ValueError(f"distributed.strategy={strategy!r}; valid: {', '.join(STRATEGIES)}")


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Accumulate without communicating (`enabled=False`) on every backward of an accumulated step but the last."""
    if enabled or not dist.is_initialized():
        yield
        return
    if isinstance(module, nn.parallel.DistributedDataParallel):
        with module.no_sync():
            yield
        return
    setter = getattr(module, "set_requires_gradient_sync", None)  # FSDP2
    if setter is None:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)


# ---------------------------------------------------------------------------------------------- collectives
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order (every rank holds the same shape)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_strings(items: Sequence[str | None]) -> list[str | None]:
    """Every rank's strings in rank order, through uint8 tensors (no pickle, unlike `all_gather_object`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    enc = [b"\x00" if s is None else b"\x01" + s.encode("utf-8") for s in items]
    lengths = torch.tensor([len(e) for e in enc], dtype=torch.int64)
    all_lengths = all_gather_cat(lengths)
    longest = int(all_lengths.max()) if all_lengths.numel() else 1
    buf = torch.zeros(len(enc), max(longest, 1), dtype=torch.uint8)
    for i, e in enumerate(enc):
        buf[i, :len(e)] = torch.frombuffer(bytearray(e), dtype=torch.uint8)
    rows = all_gather_cat(buf)
    out: list[str | None] = []
    for row, n in zip(rows, all_lengths.tolist(), strict=True):
        b = bytes(row[:n].tolist())
        out.append(None if b[:1] == b"\x00" else b[1:].decode("utf-8"))
    return out


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums over ranks of a few scalars (float64 so that counts stay exact)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean_grads(grads: Sequence[torch.Tensor | None],
                          params: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's gradient averaged over ranks, in one flat all-reduce. A gradient that is None on some ranks
    (the parameter was not in their graph) counts as zeros there, and stays None only where it is None on every
    rank: what one process with the whole batch would hold."""
    out = list(grads)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    dev = next((g.device for g in out if g is not None), params[0].device if params else None)
    present = torch.tensor([g is not None for g in out], dtype=torch.int32, device=dev)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)  # the same buffer layout on every rank
    idx = [i for i, flag in enumerate(present.tolist()) if flag]
    if not idx:
        return out
    flat = torch.cat([(out[i] if out[i] is not None else torch.zeros_like(params[i])).reshape(-1).float()
                      for i in idx])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for i in idx:
        n = params[i].numel()
        out[i] = flat[offset:offset + n].view_as(params[i]).to(params[i].dtype)
        offset += n
    return out


def all_reduce_stats(stats: dict[str, float]) -> dict[str, float]:
    """Logged per-rank statistics made global: means averaged (equal shards), .../max maxed, .../min minned, counts
    summed. Averaged means of nonlinear statistics (a ratio's mean over kept elements) are close to, not equal to,
    one process's; the weights are what must agree.

    Every rank must hold the same keys (they come from the same code path on equally sized shards)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return stats
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    mean, mx, mn = t.clone(), t.clone(), t.clone()
    dist.all_reduce(mean)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(mn, op=dist.ReduceOp.MIN)
    w = dist.get_world_size()
    out = {}
    for i, k in enumerate(keys):
        if k.endswith("/max"):
            out[k] = float(mx[i])
        elif k.endswith("/min"):
            out[k] = float(mn[i])
        else:  # "elements" counts: summed; everything else averaged
            out[k] = float(mean[i]) if k in SUMMED_STATS else float(mean[i]) / w
    return out


def gather_reward_output(out):
    """The global batch's `RewardOutput` on every rank, in shard order."""
    from margrpo.rewards.base import RewardOutput

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    names = sorted(out.components)
    if all_gather_strings(["\x1f".join(names)]) != ["\x1f".join(names)] * dist.get_world_size():
        raise RuntimeError("the reward returned different component names on different ranks")
    cats = None
    has_cats = all_reduce_sum([out.categories is not None])[0]
    if has_cats:
        cats = [c or "" for c in all_gather_strings(out.categories or [""] * len(out))]
    elapsed = all_reduce_sum([out.elapsed_s])[0]
    return RewardOutput(scores=all_gather_cat(out.scores.float()),
                        valid=all_gather_cat(out.valid.to(torch.uint8)).bool(),
                        components={k: all_gather_cat(out.components[k].float()) for k in names},
                        reasons=all_gather_strings(out.reasons), categories=cats, elapsed_s=elapsed)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's boolean on every rank (decisions that read the disk, taken once)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------- rollouts
def cat_rollouts(parts: list):
    """Rollouts of several shards as one (the batch a single process draws for the shards it owns).

    Per-image tensors are joined along the batch; the packed trajectories (image-major) along the token axis;
    MTE token indices are offset by the tokens of the shards before them."""
    from margrpo.models.conditioning import Condition
    from margrpo.sampling.rollout import ARStepRecord, Rollout

    if len(parts) == 1:
        return parts[0]
    first = parts[0]

    def cat(ts, dim=0):
        return None if ts[0] is None else torch.cat(ts, dim=dim)

    steps = {}
    for i, rec in first.steps.items():
        recs = [p.steps[i] for p in parts]
        offsets, n = [], 0
        for r in recs:
            offsets.append(n)
            n += int(r.diffused.sum())
        mte_tokens = None if rec.mte_tokens is None else torch.cat(
            [r.mte_tokens + o for r, o in zip(recs, offsets, strict=True)])
        steps[i] = ARStepRecord(
            ar_step=rec.ar_step, known=cat([r.known for r in recs]), to_pred=cat([r.to_pred for r in recs]),
            diffused=cat([r.diffused for r in recs]), canvas=cat([r.canvas for r in recs]), guidance=rec.guidance,
            x=cat([r.x for r in recs], 1), logp=cat([r.logp for r in recs], 1),
            logp_cond=cat([r.logp_cond for r in recs], 1), z=cat([r.z for r in recs]),
            z_uncond=cat([r.z_uncond for r in recs]), mte_tokens=mte_tokens, mte_head_steps=rec.mte_head_steps,
            mte_x=cat([r.mte_x for r in recs], 2), mte_logp=cat([r.mte_logp for r in recs], 2))
    cond = None
    if first.cond is not None:
        cond = (Condition.cat([p.cond for p in parts]) if isinstance(first.cond, Condition)
                else torch.cat([p.cond for p in parts]))
    return Rollout(cond=cond, orders=cat([p.orders for p in parts]), counts=list(first.counts),
                   tokens=cat([p.tokens for p in parts]), steps=steps, head_steps=first.head_steps,
                   guidance_scale=first.guidance_scale, guidance_schedule=first.guidance_schedule,
                   temperature=first.temperature, policy_tokens=first.policy_tokens,
                   prompts=[q for p in parts for q in p.prompts], mte_source=first.mte_source)
