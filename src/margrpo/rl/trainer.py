"""The GRPO / MAR-GRPO training loop. One step, `Trainer.train_step`, reads top to bottom as nanoGPT's loop does:

    batch   = rollout(step)                  prompts of the step, images sampled and recorded for the loss
    rewards = rewards(batch)                 the global batch's rewards, on every rank
    adv     = group_advantages(rewards, ..)  group-relative (`rl/advantages.py`), invalid and tied groups left out
    losses  = update(step, batch, adv)       PPO epochs over the scored AR steps (+ the ptx term), optimizer steps
    return metrics(...)                      one metrics.jsonl row

All randomness per step comes from generators derived from (seed, stream, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. Under torchrun the same loop runs on every
process, each on its shards of the global batch (`rl/distributed.py`; docs/design.md, "Distributed").

Run directory (`out_dir`): `config.yaml`, `metrics.jsonl` + TensorBoard events, `checkpoints/step-N/`
(`rl/checkpoints.py`: trainable weights, optimizer, step; the frozen reference and head are not duplicated: they
come from the base model), `samples/step-N.png`, `report.png`, and `model/` (`rl/outputs.py`).
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.loading import load_model
from margrpo.rl import checkpoints, outputs
from margrpo.rl import distributed as D
from margrpo.rl.advantages import Advantages, group_advantages
from margrpo.rl.category_metrics import accuracy_metrics
from margrpo.rl.config import TrainConfig
from margrpo.rl.eval_loop import TrainingEvaluator
from margrpo.rl.faults import (
    MAX_BAD_STEPS,
    DriftStop,
    StepFault,
    StopRequest,
    TrainingFault,
    TrainingStopped,
    loss_fault,
    raise_on_any_rank,
)
from margrpo.rl.loss import PolicyNorm, ar_step_loss
from margrpo.rl.monitors import DriftMonitor, token_period
from margrpo.rl.prompts import PromptSource
from margrpo.rl.selection import select_steps
from margrpo.sampling.rollout import Rollout
from margrpo.sampling.sampler import sample
from margrpo.utils.checkpoint import latest_checkpoint, point_latest
from margrpo.utils.config import save_config
from margrpo.utils.metrics import MetricsWriter, StepTimer
from margrpo.utils.rng import make_generator


@dataclass
class Batch:
    """This process's part of one step's global batch: the rollout, its images and prompts, and what the loss scores
    (the same AR steps and head steps on every rank)."""

    rollout: Rollout
    images: torch.Tensor
    prompts: list[str]
    metas: list[dict]
    ar_steps: list[int]
    head_steps: dict[int, list[int]]
    groups: torch.Tensor  # [global batch] the prompt (group) of every image of the global batch


class Trainer:
    """One training run: `Trainer(cfg).run()`; `train_step` is one GRPO / MAR-GRPO step read top to bottom."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = D.init_from_env(cfg.device)  # torchrun's processes join here (WORLD_SIZE > 1)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.fsdp = self.world > 1 and cfg.distributed.strategy == "fsdp"
        self.out = Path(cfg.out_dir)
        self.shards = D.check_shards(cfg, self.world)
        self.progress = progress and self.rank == 0  # one progress bar, rank 0's
        self.model = load_model(cfg.model, self.device)
        # RL never wants dropout: sampling and the loss's recomputation (including gradient checkpointing's
        # re-forward during backward) must see the same function.
        self.model.eval()
        if cfg.sampling.diffusion_steps is not None:
            self.model.head.set_sampling_steps(cfg.sampling.diffusion_steps)
        if cfg.gradient_checkpointing:
            self.model.policy.set_gradient_checkpointing(True)
        a = cfg.algorithm
        # copied before wrapping and before any adapter: a plain frozen replica of the base
        self.reference = copy.deepcopy(self.model.policy).eval().requires_grad_(False) if a.beta > 0 else None
        self.state = checkpoints.TrainingState.create(cfg, self.model, self.dist)
        self.policy = self.state.policy  # what the sampler and the loss call (DDP / FSDP2's module: its hooks fire)
        from margrpo.rewards import build_rewards

        self.reward = build_rewards(cfg.rewards, cfg.reward_options, device=cfg.device)
        self.prompts = PromptSource(cfg)
        self.sample_prompts = outputs.sample_prompts(cfg, self.prompts.prompts)
        # rank 0 evaluates alone (DDP: its unwrapped replica needs no collectives; FSDP2 refuses eval for now)
        self.evaluator = self.monitor = None
        if cfg.eval.every > 0 and self.rank == 0:
            self.monitor = DriftMonitor(cfg.monitors.bounds, cfg.monitors.watch, self.out / "eval",
                                        token_period(self.model), cfg.device)
            self.evaluator = TrainingEvaluator(cfg, self.out, self.monitor)
        self.ptx_data = None
        if a.ptx_weight > 0:
            if cfg.prompts.source != "shapes":
                raise ValueError("algorithm.ptx_weight > 0 needs training images, which only the shapes world "
                                 f"renders; prompts.source is {cfg.prompts.source!r} (set ptx_weight: 0)")
            from margrpo.worlds import shapes
            from margrpo.worlds.shapes.data import ShapesBatches

            self.ptx_data = ShapesBatches(cfg.seed, a.ptx_batch_size, 0, self.model.image_size,
                                          dict.fromkeys(shapes.CATEGORIES, 1.0), stream="ptx")

    @property
    def params(self) -> list[tuple[str, torch.nn.Parameter]]:  # the trainable parameters, by name
        return self.state.params

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, float]:
        """rollout -> rewards -> advantages -> update -> metrics (the module docstring)."""
        timer = StepTimer()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with timer("rollout"):
            batch = self.rollout(step)
        with timer("reward"):
            rewards = self.rewards(batch)
            a = self.cfg.algorithm
            adv = group_advantages(torch.nan_to_num(rewards.scores), batch.groups, rewards.valid, a.advantage_std)
        with timer("update"):
            losses, grad_norms = self.update(step, batch, adv)
        return self.metrics(batch, rewards, adv, losses, grad_norms, timer)

    def rollout(self, step: int) -> Batch:
        """This process's shards of the global batch, as one rollout (groups numbered locally), and its images.

        Shard k draws its prompts and noise from streams keyed by k, so the global batch depends on the shard count,
        not on how many processes share it. The scored steps are keyed by rank 0 on every rank: all ranks score the
        same AR steps (their optimizer steps must line up under update=ar_step)."""
        a = self.cfg.algorithm
        ar_steps, head_steps, plan = select_steps(self.cfg, self.model.policy, step, 0)
        per_rank, groups = self.shards // self.world, a.prompts_per_step // self.shards
        parts, metas, fault = [], [], None
        for shard in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            prompts, meta = self.prompts.batch(step, groups, shard, self.shards)
            cond = self.model.encode_prompts(prompts)
            cond = cond.repeat_interleave(a.group_size) if cond is not None else None
            try:
                with self._autocast():
                    r = sample(self.policy, cond, groups * a.group_size, self.cfg.sampling,
                               make_generator(self.cfg.seed, "rollout", shard, step, device=self.device),
                               make_generator(self.cfg.seed, "mte", shard, step, device=self.device), record=plan)
            except FloatingPointError as e:  # the sampler refuses non-finite tokens or log-probabilities
                fault = StepFault(str(e), f"step {step + 1}, the rollout", float("nan"))
                break
            r.prompts = [p for p in prompts for _ in range(a.group_size)]
            parts.append(r)
            metas += [m for m in meta for _ in range(a.group_size)]
        raise_on_any_rank(fault, f"step {step + 1}, the rollout")
        rollout = D.cat_rollouts(parts)
        rollout.group = torch.arange(groups * per_rank).repeat_interleave(a.group_size)
        return Batch(rollout, self.model.decode(rollout.tokens).float(), rollout.prompts, metas, ar_steps, head_steps,
                     torch.arange(a.prompts_per_step).repeat_interleave(a.group_size))

    def rewards(self, batch: Batch):
        """The global batch's rewards on every rank, so that advantages, statistics and the failure guard are one
        process's."""
        out = D.gather_reward_output(self.reward(batch.images, batch.prompts, batch.metas))
        self.state.guard.update(out)
        return out

    def update(self, step: int, batch: Batch, adv: Advantages) -> tuple[dict[str, list[float]], list[float]]:
        """`ppo_epochs` passes over the scored AR steps: per AR step one loss and backward (accumulated backwards
        communicate only on the last), one optimizer step per rollout and epoch (or per AR step: `update: ar_step`),
        the ptx term once per rollout. Returns the loss statistics and the gradient norms."""
        a = self.cfg.algorithm
        mine = slice(self.rank * batch.rollout.batch_size, (self.rank + 1) * batch.rollout.batch_size)
        values, use = adv.values[mine], adv.use[mine]  # this process's images
        norm = PolicyNorm.of(batch.rollout, batch.ar_steps, batch.head_steps, use, a, self.world,
                             D.all_reduce_sum)  # the kept tokens and each rank's weight, once per rollout
        stats: dict[str, list[float]] = {}
        grad_norms: list[float] = []
        cache: dict = {}  # the reference's transitions and the forward-process estimators' old terms, across epochs
        scale = 1.0 if a.update == "ar_step" else 1.0 / len(batch.ar_steps)
        for epoch in range(a.ppo_epochs):
            self.state.opt.zero_grad(set_to_none=True)
            for k, i in enumerate(batch.ar_steps):
                where = f"step {step + 1}, AR step {i}, PPO epoch {epoch}"
                with D.gradient_sync(self.policy, a.update == "ar_step" or k == len(batch.ar_steps) - 1):
                    with self._autocast():
                        # the forward-process estimators' draws: the same in every PPO epoch (rho = 1 before updating)
                        g = (make_generator(self.cfg.seed, "matching", self.rank, step, i, device=self.device)
                             if a.estimator != "trajectory" else None)
                        sl = ar_step_loss(self.policy, self.reference, batch.rollout, i, batch.head_steps[i],
                                          values, use, a, cache, first_epoch=epoch == 0, generator=g, norm=norm)
                    raise_on_any_rank(loss_fault(sl.loss, sl.stats, where, self.cfg.faults), where)
                    (sl.loss * scale).backward()
                for key, v in sl.stats.items():
                    stats.setdefault(key, []).append(v)
                if a.update == "ar_step":
                    self._add_ptx(step, stats, first=not grad_norms)
                    grad_norms.append(self._optimizer_step())
            if a.update == "rollout":
                self._add_ptx(step, stats, first=not grad_norms)
                grad_norms.append(self._optimizer_step())
        return stats, grad_norms

    def metrics(self, batch: Batch, rewards, adv: Advantages, losses: dict[str, list[float]],
                grad_norms: list[float], timer: StepTimer) -> dict[str, float]:
        """One metrics row: the loss statistics of the global batch (equal shards: the mean of the ranks' means; the
        extreme ratios their extremes), rewards, accuracy, advantages, gradient norms, timings and memory."""
        rec: dict[str, float] = {k: float(np.mean(v)) for k, v in losses.items() if k not in ("ratio/max", "ratio/min")}
        if "ratio/max" in losses:
            rec["ratio/max"] = float(np.max(losses["ratio/max"]))
            rec["ratio/min"] = float(np.min(losses["ratio/min"]))
        rec = D.all_reduce_stats(rec)
        rec.update(rewards.summary("reward"))
        rec.update(accuracy_metrics(rewards))  # accuracy/strict and accuracy/by_category/<c>
        rec.update({
            "advantage/mean": float(adv.values[adv.use].mean()) if bool(adv.use.any()) else 0.0,
            "advantage/std": float(adv.values[adv.use].std()) if int(adv.use.sum()) > 1 else 0.0,
            "advantage/abs_max": float(adv.values.abs().max()),
            "zero_signal_fraction": adv.zero_signal_fraction, "reward/invalid": float(adv.invalid),
            "grad_norm": float(np.mean(grad_norms)), "grad_norm/max": float(np.max(grad_norms)),
            "lr": self.cfg.optim.lr, "rollout/mbytes": batch.rollout.nbytes() / 2**20,
        })
        rec.update(timer.summary(prefix="time/"))
        rec["memory/peak_gb"] = (torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        return rec

    # ------------------------------------------------------------------ pieces of the update
    def ptx_loss(self, step: int) -> torch.Tensor:
        """The MAR pretraining loss on this process's part of shapes-world training batch `step`.

        The batch (a pure function of seed and step) is cut into the rollout shards' equal parts, each with its own
        random stream keyed by the shard, like the rollouts: the mean over a process's parts, averaged over the
        processes, is the one-process loss whatever the world size (one shard: the whole batch, stream 0)."""
        from margrpo.worlds.shapes.data import uint8_to_model_range

        imgs, prompts = self.ptx_data.batch(step)
        per_rank, size = self.shards // self.world, len(prompts) // self.shards
        losses = []
        for shard in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            part = slice(shard * size, (shard + 1) * size)
            g = make_generator(self.cfg.seed, "ptx", shard, step, device=self.device)
            with torch.no_grad():
                cond = self.model.encode_prompts(list(prompts[part]))
                tokens = self.model.encode_images(uint8_to_model_range(imgs[part], self.device), generator=g)
            with self._autocast():
                losses.append(self.model.policy.pretrain_loss(tokens, cond, g, drop_conditions=True))
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        fault = None if torch.isfinite(loss) else StepFault("non-finite pretraining (ptx) loss", f"step {step + 1}",
                                                            float(loss))
        raise_on_any_rank(fault, f"step {step + 1}, ptx")  # before the others wait in its gradient's all-reduce
        return loss

    def _add_ptx(self, step: int, stats: dict[str, list[float]], first: bool) -> None:
        """Accumulate ptx_weight x the pretraining loss into the first optimizer step of each rollout.

        Once per rollout, not once per optimizer step: a 64-image pretraining forward/backward is as costly as
        the policy term of a whole grpo rollout, and its gradient hardly changes between PPO epochs.
        """
        if self.ptx_data is None or not first:
            return
        loss = self.ptx_loss(step)
        weight = self.cfg.algorithm.ptx_weight
        if self.world == 1:
            (weight * loss).backward()
        else:
            # The loss runs outside the DDP module's forward (pretraining is not the module call), so DDP does not
            # reduce it: its gradient is taken apart, averaged over the processes and added to the synced one.
            params = [p for _, p in self.state.params]
            grads = torch.autograd.grad(weight * loss, params, allow_unused=True)
            for p, g in zip(params, D.all_reduce_mean_grads(grads, params), strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        stats.setdefault("loss/ptx", []).append(float(loss.detach()))

    def _optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for _, p in self.state.params]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            raise StepFault("non-finite gradient norm", "the optimizer step", float(norm))
        self.state.opt.step()
        self.state.opt.zero_grad(set_to_none=True)
        if self.state.ema is not None:
            self.state.ema.update()
        return float(norm)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast != "none")

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> list[dict]:
        """Train to `cfg.steps`; returns the logged rows of the training steps (metrics.jsonl less step 0)."""
        from margrpo.rewards import RewardFailure

        # only rank 0 writes files (config, metrics, samples, checkpoint metadata, the exported model)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        taken = D.broadcast_flag(latest_checkpoint(self.out) is not None) if not resume else False
        if taken:
            raise FileExistsError(f"{self.out} already holds checkpoints of another run; pass --resume to continue "
                                  "it, or choose a new out_dir")
        start = self.restore() if resume else 0
        if not resume and self.rank == 0:
            save_config(self.cfg, self.out / "config.yaml")
        writer = (MetricsWriter(self.out, tensorboard=self.cfg.log.tensorboard,
                                resume_step=start if resume else None, overwrite=not resume,
                                mirrors=outputs.wandb_mirrors(self.cfg, self.out, resume))
                  if self.rank == 0 else outputs.NoWriter())
        D.barrier()
        if not resume:
            self.save_samples(0)
            if self.evaluator is not None and self.rank == 0:
                writer.log(0, self.evaluate(0))
            if self._within_bounds(0):  # monitors.stop: a drift at the first evaluation returns to the base weights
                self.save(0)
        bar = tqdm(range(start, self.cfg.steps), initial=start, total=self.cfg.steps, desc="train",
                   disable=not self.progress)
        stop = StopRequest()
        try:
            with stop:
                for step in bar:
                    self._run_step(step, writer, bar)
                    stopped = D.all_reduce_sum([stop.signum is not None])[0] > 0  # one rank's signal stops all
                    if stopped:
                        done = step + 1
                        if latest_checkpoint(self.out) != self.out / "checkpoints" / f"step-{done}":
                            self.save(done)
                        writer.close()
                        raise TrainingStopped(done, stop.signum or 0, self.out)
        except RewardFailure:
            self.save(step)
            writer.close()
            raise
        writer.close()
        return outputs.finish(self.model, self.cfg, self.out, self.state.ema, self.state.lora is not None,
                              self.evaluator is not None, self.dist, self.fsdp, self.monitor)

    def _run_step(self, step: int, writer: MetricsWriter, bar) -> None:
        """One training step and its logging, evaluation, samples and checkpoint; a step with a numerical fault is
        skipped with weights, optimizer and EMA as before it."""
        t0 = time.perf_counter()
        state, limit = self.state, MAX_BAD_STEPS
        snapshot = state.snapshot()
        try:
            rec = self.train_step(step)
            state.bad_steps = 0
        except StepFault as fault:
            state.put_back(snapshot)
            state.bad_steps += 1
            print(f"step {step + 1}: skipped, {fault} ({state.bad_steps} bad in a row; the run stops at {limit})",
                  file=sys.stderr)
            rec = {"fault/skipped": 1.0, "fault/consecutive": float(state.bad_steps)}
            if state.bad_steps >= limit:
                writer.log(step + 1, rec)
                self.save(step + 1)
                raise TrainingFault(
                    f"{state.bad_steps} bad steps in a row, the last: {fault}. The checkpoint of step {step + 1} in "
                    f"{self.out / 'checkpoints'} holds the weights of the last good step, "
                    f"{step + 1 - state.bad_steps}; change what made the steps bad and continue with "
                    f"margrpo train --resume {self.out}") from fault
        rec["time/step"] = time.perf_counter() - t0
        done = step + 1
        evaluate_now = (self.evaluator is not None and self.rank == 0
                        and (done % self.cfg.eval.every == 0 or done == self.cfg.steps))
        if evaluate_now:
            rec.update(self.evaluate(done))
        within = self._within_bounds(done)
        writer.log(done, rec)
        bar.set_postfix(reward=f"{rec.get('reward/mean', float('nan')):.3f}", kl=f"{rec.get('loss/kl', 0):.2e}")
        if done % self.cfg.log.sample_every == 0 or done == self.cfg.steps:
            self.save_samples(done)
        if done % self.cfg.log.checkpoint_every == 0 or done == self.cfg.steps or within:
            self.save(done)
        if within is False:
            writer.close()
            raise self._drift_stop(done)

    def _within_bounds(self, done: int) -> bool | None:
        """With `monitors.stop`, at an evaluation step: whether rank 0's monitors found every value within its bound
        (the same verdict on every rank); such a step becomes `last_within_bounds`. None at other steps."""
        c = self.cfg
        if not (c.monitors.stop and c.eval.every > 0 and (done % c.eval.every == 0 or done == c.steps)):
            return None
        within = D.broadcast_flag(self.monitor is None or not self.monitor.beyond)
        if within:
            self.state.last_within_bounds = done
        return within

    def _drift_stop(self, step: int) -> DriftStop:
        """monitors.stop: point `--resume` at the checkpoint of the last evaluation within bounds, draw the report."""
        good = self.state.last_within_bounds
        where = "no checkpoint within bounds is recorded (a run resumed from a checkpoint older than the monitors)"
        if self.rank == 0:
            if good is not None:
                where = (f"{point_latest(self.out, good)} holds the weights of step {good}, the last evaluation within "
                         f"the bounds, and is the checkpoint --resume continues from")
            outputs.write_report(self.out, self.evaluator is not None, self.monitor)
        D.barrier()
        beyond = "(see rank 0's message)"
        if self.monitor is not None:
            beyond = "; ".join(d.describe() for d in self.monitor.beyond)
        return DriftStop(f"reward-hacking monitors (monitors.stop): at step {step}, {beyond}. {where}: change what "
                         f"drives the drift (a lower optim.lr, a larger algorithm.beta, another reward) and continue "
                         f"with margrpo train --resume {self.out} key=value ...; see {self.out / 'report.png'}")

    def evaluate(self, step: int) -> dict[str, float]:
        """In-loop verifier accuracy of the policy (and of its EMA), paired with step 0 (`rl.eval_loop`)."""
        metrics = self.evaluator.evaluate(self.model, step)
        if self.state.ema is not None and step > 0:  # at step 0 the average is the policy itself
            with self.state.ema.swapped():
                metrics.update(self.evaluator.evaluate(self.model, step, tag="_ema"))
        return metrics

    def save_samples(self, step: int) -> None:
        outputs.save_samples(self.model, self.cfg, self.sample_prompts, self.out / "samples" / f"step-{step}.png",
                             self.dist, self.fsdp)

    def save(self, step: int) -> Path:
        return checkpoints.save(self.out, step, self.state, self.dist, self.shards)

    def restore(self) -> int:
        return checkpoints.restore(self.out, self.state, self.device, self.fsdp, MAX_BAD_STEPS,
                                   keep_within_bounds=self.cfg.monitors.stop)
