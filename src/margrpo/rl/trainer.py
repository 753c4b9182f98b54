"""The GRPO / MAR-GRPO training loop: prompts -> rollout -> rewards -> advantages -> losses -> update.

Every stage is a function of explicit inputs; the loop only wires them, logs, and checkpoints. All
randomness per step comes from generators derived from (seed, stream, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have. Under torchrun the same loop runs on every
process, each on its shards of the global batch (`rl/distributed.py`; docs/design.md, "Distributed").

Run directory (`out_dir`): `config.yaml`, `metrics.jsonl` + TensorBoard events, `checkpoints/step-N/`
(trainable weights, optimizer, step; the frozen reference and head are not duplicated: they come from
the base model), `samples/step-N.png`, `report.png`, and `model/` (the final generator).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.loading import load_model
from margrpo.rl import distributed as D
from margrpo.rl.advantages import Advantages, group_advantages
from margrpo.rl.category_metrics import accuracy_metrics
from margrpo.rl.config import TrainConfig
from margrpo.rl.eval_loop import ParameterEMA, TrainingEvaluator
from margrpo.rl.faults import DriftStop, StepFault, StopRequest, TrainingFault, TrainingStopped
from margrpo.rl.loss import ar_step_loss, kept_policy_tokens
from margrpo.rl.monitors import DriftMonitor, token_period
from margrpo.rl.outputs import NoWriter, RunOutputsMixin
from margrpo.rl.persistence import CheckpointMixin
from margrpo.rl.prompts import PromptSource
from margrpo.rl.selection import select_steps
from margrpo.sampling.rollout import Rollout
from margrpo.sampling.sampler import sample
from margrpo.utils.checkpoint import latest_checkpoint, point_latest
from margrpo.utils.config import save_config
from margrpo.utils.metrics import MetricsWriter, StepTimer
from margrpo.utils.rng import make_generator


class Trainer(CheckpointMixin, RunOutputsMixin):
    """One training run: `Trainer(cfg).run()`; `train_step` is one GRPO / MAR-GRPO step read top to bottom."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = D.init_from_env(cfg.device)  # torchrun's processes join here (WORLD_SIZE > 1)
        self.rank, self.world = self.dist.rank, self.dist.world
        self.device = self.dist.device
        self.out = Path(cfg.out_dir)
        self.shards = self._check_distributed(cfg)
        self.progress = progress and self.rank == 0  # one progress bar, rank 0's
        self.model = load_model(cfg.model, self.device)
        # RL never wants dropout: sampling and the loss's recomputation (including gradient checkpointing's
        # re-forward during backward) must see the same function.
        self.model.eval()
        if cfg.sampling.diffusion_steps is not None:
            self.model.head.set_sampling_steps(cfg.sampling.diffusion_steps)
        if cfg.gradient_checkpointing:
            self.model.policy.set_gradient_checkpointing(True)
        self.reference = None
        if cfg.algorithm.beta > 0:  # copied before wrapping and before any adapter: a plain frozen replica of the base
            self.reference = copy.deepcopy(self.model.policy).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        self.lora = cfg.algorithm.train == "lora"
        if self.lora:
            from margrpo.models.lora import add_lora

            a = cfg.algorithm
            self.lora_targets = self.model.policy.lora_target_modules()
            add_lora(self.model.policy, a.lora_rank, a.lora_alpha, self.lora_targets,
                     make_generator(cfg.seed, "lora", 0, device=self.device))  # the same adapters on every rank
        self.params = self.model.trainable_parameters(cfg.algorithm.train)
        # what the sampler and replay call: the DDP / FSDP2 module in a multi-process run (so its hooks fire)
        self.policy = self.model.policy
        if self.world > 1:
            self.policy = D.wrap_policy(self.model.policy, cfg.distributed.strategy, self.dist)
            if self.fsdp:  # fully_shard swapped in sharded parameters: the optimizer must hold those
                named = dict(self.model.named_parameters())
                self.params = [(n, named[n]) for n, _ in self.params]
        o = cfg.optim
        params = [p for _, p in self.params]
        if o.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.beta1)
        else:
            self.opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, 0.999), weight_decay=0.0)
        from margrpo.rewards import RewardFailureGuard, build_rewards

        self.reward = build_rewards(cfg.rewards, cfg.reward_options, device=cfg.device)
        self.guard = RewardFailureGuard(cfg.max_reward_failure_fraction, min_samples=64)
        self.prompts = PromptSource(cfg)
        self.sample_prompts = self._sample_prompts()
        self.ema = ParameterEMA(self.params, cfg.eval.ema_decay) if cfg.eval.ema_decay > 0 else None
        # rank 0 evaluates alone (DDP: its unwrapped replica needs no collectives; FSDP2 refuses eval for now)
        self.evaluator = self.monitor = None
        if cfg.eval.every > 0 and self.rank == 0:
            self.monitor = DriftMonitor(cfg.monitors.bounds, cfg.monitors.watch, self.out / "eval",
                                        token_period(self.model), cfg.device)
            self.evaluator = TrainingEvaluator(cfg, self.out, self.monitor)
        self.last_within_bounds: int | None = None  # monitors.stop: the step of the checkpoint a drift returns to
        self.bad_steps = 0  # consecutive steps skipped for a numerical fault
        self.ptx_data = None
        if cfg.algorithm.ptx_weight > 0:
            if cfg.prompts.source != "shapes":
                raise ValueError("algorithm.ptx_weight > 0 needs training images, which only the shapes world "
                                 f"renders; prompts.source is {cfg.prompts.source!r} (set ptx_weight: 0)")
            from margrpo.worlds import shapes
            from margrpo.worlds.shapes.data import ShapesBatches

            self.ptx_data = ShapesBatches(cfg.seed, cfg.algorithm.ptx_batch_size, 0, self.model.image_size,
                                          dict.fromkeys(shapes.CATEGORIES, 1.0), stream="ptx")

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.cfg.distributed.strategy == "fsdp"

    def _check_distributed(self, cfg: TrainConfig) -> int:
        """The number of rollout shards; refuses what a multi-process run does not support (yet)."""
        shards = cfg.distributed.rollout_shards or self.world
        if shards % self.world or cfg.algorithm.prompts_per_step % shards:
            raise ValueError(f"distributed.rollout_shards={shards} must be a multiple of the world size {self.world} "
                             f"and divide algorithm.prompts_per_step={cfg.algorithm.prompts_per_step} (whole groups "
                             "per shard, equal shards per process)")
        if cfg.algorithm.ptx_weight > 0 and cfg.algorithm.ptx_batch_size % shards:
            raise ValueError(f"algorithm.ptx_batch_size={cfg.algorithm.ptx_batch_size} must be a multiple of the "
                             f"rollout shards ({shards}): each shard's ptx images are an equal part of the batch")
        if self.world > 1 and cfg.distributed.strategy == "fsdp":
            if cfg.eval.every > 0 or cfg.eval.ema_decay > 0:
                raise ValueError("distributed.strategy=fsdp: in-loop evaluation and the EMA are not supported yet "
                                 "(set eval.every=0 and eval.ema_decay=0, or use strategy=ddp)")
            if cfg.algorithm.ptx_weight > 0:
                raise ValueError("distributed.strategy=fsdp: algorithm.ptx_weight > 0 is not supported yet (its "
                                 "loss runs outside the sharded module's forward; use strategy=ddp or ptx_weight: 0)")
        return shards

    def _sample_prompts(self) -> list[str]:
        if self.cfg.prompts.fixed:
            return list(self.cfg.prompts.fixed)[:8]
        if self.cfg.prompts.source == "shapes":
            from margrpo.worlds import shapes

            return list(shapes.DEMO_PROMPTS)
        return self.prompts.prompts[:8]

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int) -> tuple[Rollout, list[str], list[dict], list[int], dict[int, list[int]]]:
        """This process's shards of the global batch, as one rollout (groups numbered locally).

        Shard k draws its prompts and noise from streams keyed by k, so the global batch depends on the shard count,
        not on how many processes share it. The scored steps are keyed by rank 0 on every rank: all ranks score the
        same AR steps (their optimizer steps must line up under update=ar_step)."""
        a = self.cfg.algorithm
        ar, head_steps, plan = select_steps(self.cfg, self.model.policy, step, 0)
        per_rank, groups = self.shards // self.world, a.prompts_per_step // self.shards
        parts, metas = [], []
        for shard in range(self.rank * per_rank, (self.rank + 1) * per_rank):
            prompts, meta = self.prompts.batch(step, groups, shard, self.shards)
            cond = self.model.encode_prompts(prompts)
            cond = cond.repeat_interleave(a.group_size) if cond is not None else None
            with self._autocast():
                r = sample(self.policy, cond, groups * a.group_size, self.cfg.sampling,
                           make_generator(self.cfg.seed, "rollout", shard, step, device=self.device),
                           make_generator(self.cfg.seed, "mte", shard, step, device=self.device), record=plan)
            r.prompts = [p for p in prompts for _ in range(a.group_size)]
            parts.append(r)
            metas += [m for m in meta for _ in range(a.group_size)]
        r = D.cat_rollouts(parts)
        r.group = torch.arange(groups * per_rank).repeat_interleave(a.group_size)
        return r, r.prompts, metas, ar, head_steps

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
        self._raise_on_any_rank(fault, f"step {step + 1}, ptx")  # before the others wait in its gradient's all-reduce
        return loss

    def _autocast(self):
        if self.cfg.autocast == "none":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, step: int) -> dict[str, float]:
        a = self.cfg.algorithm
        timer = StepTimer()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with timer("rollout"):
            fault = None
            try:
                rollout, prompts, metas, ar_steps, head_steps = self.rollout(step)
            except FloatingPointError as e:  # the sampler refuses non-finite tokens or log-probabilities
                fault = StepFault(str(e), f"step {step + 1}, the rollout", float("nan"))
            self._raise_on_any_rank(fault, f"step {step + 1}, the rollout")
            images = self.model.decode(rollout.tokens).float()
        with timer("reward"):
            # the global batch's rewards on every rank: advantages, statistics and the guard are one process's
            out = D.gather_reward_output(self.reward(images, prompts, metas))
            self.guard.update(out)
            groups = (rollout.group if self.world == 1
                      else torch.arange(a.prompts_per_step).repeat_interleave(a.group_size))
            gadv = group_advantages(torch.nan_to_num(out.scores), groups, out.valid, a.advantage_std,
                                    clip=a.advantage_clip)
            mine = slice(self.rank * rollout.batch_size, (self.rank + 1) * rollout.batch_size)
            adv = gadv if self.world == 1 else Advantages(gadv.values[mine], gadv.use[mine], gadv.num_groups,
                                                          gadv.tied_groups, gadv.invalid)
        stats: dict[str, list[float]] = {}
        grad_norms = []
        denominator = None
        if a.normalize == "rollout":  # kept (token, head step) pairs of the whole rollout, per scored AR step
            draws = a.noise_draws if a.estimator != "trajectory" else None
            pairs = sum(float(kept_policy_tokens(rollout, i, adv.use, a).sum()) * (draws or len(head_steps[i]))
                        for i in ar_steps)
            # every AR step's loss is scaled by 1 / len(ar_steps) below; this makes each pair weigh 1 / pairs
            pairs = D.all_reduce_sum([pairs])[0]  # the global batch's pairs
            denominator = max(pairs, 1.0) / (1 if a.update == "ar_step" else len(ar_steps))
        weights = self._policy_weights(rollout, ar_steps, adv)
        with timer("update"):
            old_cache: dict = {}
            for epoch in range(a.ppo_epochs):
                self.opt.zero_grad(set_to_none=True)
                for k, i in enumerate(ar_steps):
                    # accumulated backwards (one per AR step, one optimizer step) communicate only on the last
                    sync = a.update == "ar_step" or k == len(ar_steps) - 1
                    with D.gradient_sync(self.policy, sync):
                        with self._autocast():
                            # the forward-process estimators' draws: the same in every PPO epoch (rho = 1 before
                            # updating)
                            g = (make_generator(self.cfg.seed, "matching", self.rank, step, i, device=self.device)
                                 if a.estimator != "trajectory" else None)
                            sl = ar_step_loss(self.policy, self.reference, rollout, i, head_steps[i], adv.values,
                                              adv.use, a, old_cache, first_epoch=epoch == 0, generator=g,
                                              policy_denominator=denominator, policy_weight=weights[i])
                        self._check_step_loss(sl, step, i, epoch)
                        scale = 1.0 if a.update == "ar_step" else 1.0 / len(ar_steps)
                        (sl.loss * scale).backward()
                    for k, v in sl.stats.items():
                        stats.setdefault(k, []).append(v)
                    if a.update == "ar_step":
                        self._add_ptx(step, stats, first=not grad_norms)
                        grad_norms.append(self._optimizer_step())
                if a.update == "rollout":
                    self._add_ptx(step, stats, first=not grad_norms)
                    grad_norms.append(self._optimizer_step())
        rec: dict[str, float] = {k: float(np.mean(v)) for k, v in stats.items() if k not in ("ratio/max", "ratio/min")}
        if "ratio/max" in stats:
            rec["ratio/max"] = float(np.max(stats["ratio/max"]))
            rec["ratio/min"] = float(np.min(stats["ratio/min"]))
        rec = D.all_reduce_stats(rec)  # the loss statistics of the global batch (equal shards: mean of means)
        rec.update(out.summary("reward"))
        rec.update(accuracy_metrics(out))  # accuracy/strict and accuracy/by_category/<c>
        rec.update({
            "advantage/mean": float(gadv.values[gadv.use].mean()) if bool(gadv.use.any()) else 0.0,
            "advantage/std": float(gadv.values[gadv.use].std()) if int(gadv.use.sum()) > 1 else 0.0,
            "advantage/abs_max": float(gadv.values.abs().max()),
            "zero_signal_fraction": gadv.zero_signal_fraction, "reward/invalid": float(gadv.invalid),
            "grad_norm": float(np.mean(grad_norms)), "grad_norm/max": float(np.max(grad_norms)),
            "lr": self.cfg.optim.lr, "rollout/mbytes": rollout.nbytes() / 2**20,
        })
        rec.update(timer.summary(prefix="time/"))
        if self.device.type == "cuda":
            rec["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            rec["memory/peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return rec

    def _policy_weights(self, rollout: Rollout, ar_steps: list[int], adv: Advantages) -> dict[int, float]:
        """Per scored AR step, the factor on this rank's policy term that makes the ranks' averaged gradient the
        gradient of one mean over the global batch.

        A rank's term is a mean over its k_r kept elements; DDP / FSDP average over W ranks; the one-process term is
        sum / K with K = sum_r k_r. So rank r's mean is weighed W k_r / K (k counts kept tokens: head steps and
        channels are the same on every rank). With normalize=rollout the term already divides by the global count,
        so the weight is W. The KL is a mean over all tokens of equal shards: its average needs no weight."""
        a = self.cfg.algorithm
        if self.world == 1:
            return dict.fromkeys(ar_steps, 1.0)
        if a.normalize == "rollout":
            return dict.fromkeys(ar_steps, float(self.world))
        local = [float(kept_policy_tokens(rollout, i, adv.use, a).sum()) for i in ar_steps]
        total = D.all_reduce_sum(local)
        return {i: self.world * k / t if t > 0 else 1.0 for i, k, t in zip(ar_steps, local, total, strict=True)}

    def _add_ptx(self, step: int, stats: dict[str, list[float]], first: bool) -> None:
        """Accumulate ptx_weight x the pretraining loss into the first optimizer step of each rollout.

        Once per rollout, not once per optimizer step: a 64-image pretraining forward/backward is as costly as
        the policy term of a whole grpo rollout, and its gradient hardly changes between PPO epochs.
        """
        if self.ptx_data is None or not first:
            return
        loss = self.ptx_loss(step)
        if self.world == 1:
            (self.cfg.algorithm.ptx_weight * loss).backward()
        else:
            # The loss runs outside the DDP module's forward (pretraining is not the module call), so DDP does not
            # reduce it: its gradient is taken apart, averaged over the processes and added to the synced one.
            params = [p for _, p in self.params]
            grads = torch.autograd.grad(self.cfg.algorithm.ptx_weight * loss, params, allow_unused=True)
            for p, g in zip(params, D.all_reduce_mean_grads(grads, params), strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        stats.setdefault("loss/ptx", []).append(float(loss.detach()))

    def _raise_on_any_rank(self, fault: StepFault | None, where: str) -> None:
        """Raise `fault`, or, when another rank found one, a fault saying so: a step is skipped on every rank or on
        none (one rank skipping alone would leave the others waiting in its collectives)."""
        if self.world > 1 and D.all_reduce_sum([fault is not None])[0] > 0 and fault is None:
            raise StepFault("a fault on another rank", where, float("nan"))
        if fault is not None:
            raise fault

    def _check_step_loss(self, sl, step: int, ar_step: int, epoch: int) -> None:
        """Non-finite losses, and KL or PPO log-ratios beyond `faults.max_kl` / `faults.max_log_ratio`, are faults."""
        where = f"step {step + 1}, AR step {ar_step}, PPO epoch {epoch}"
        f = self.cfg.faults
        fault = None
        if not torch.isfinite(sl.loss):
            fault = StepFault("non-finite loss", where, float(sl.loss.detach()))
        elif f.max_kl is not None and sl.stats.get("loss/kl", 0.0) > f.max_kl:
            fault = StepFault(f"KL to the reference above faults.max_kl={f.max_kl}", where, sl.stats["loss/kl"])
        elif f.max_log_ratio is not None:
            keys = ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min")  # MTE chains carry their own ratios
            log_ratio = max(abs(math.log(max(sl.stats.get(k, 1.0), 1e-30))) for k in keys)
            if log_ratio > f.max_log_ratio:
                fault = StepFault(f"PPO log-ratio above faults.max_log_ratio={f.max_log_ratio}", where, log_ratio)
        self._raise_on_any_rank(fault, where)

    def _snapshot(self) -> tuple[dict, dict, dict | None]:
        """Trainable weights, optimizer state and EMA, to put back when a step turns out bad."""
        params = {n: p.detach().clone() for n, p in self.params}
        opt = copy.deepcopy(self.opt.state_dict())
        ema = {n: t.clone() for n, t in self.ema.shadow.items()} if self.ema is not None else None
        return params, opt, ema

    def _restore_snapshot(self, snap: tuple[dict, dict, dict | None]) -> None:
        params, opt, ema = snap
        with torch.no_grad():
            for n, p in self.params:
                p.copy_(params[n])
        self.opt.load_state_dict(opt)
        self.opt.zero_grad(set_to_none=True)
        if ema is not None:
            self.ema.shadow = ema

    def _optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for _, p in self.params]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            raise StepFault("non-finite gradient norm", "the optimizer step", float(norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return float(norm)

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
                                mirrors=self._wandb(resume))
                  if self.rank == 0 else NoWriter())
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
        return self._finish()

    def _run_step(self, step: int, writer: MetricsWriter, bar) -> None:
        """One training step and its logging, evaluation, samples and checkpoint."""
        t0 = time.perf_counter()
        snapshot = self._snapshot()
        try:
            rec = self.train_step(step)
            self.bad_steps = 0
        except StepFault as fault:  # skip the step: weights, optimizer and EMA as before it
            self._restore_snapshot(snapshot)
            self.bad_steps += 1
            print(f"step {step + 1}: skipped, {fault} ({self.bad_steps} bad in a row; the run stops at "
                  f"{self.cfg.faults.max_consecutive})", file=sys.stderr)
            rec = {"fault/skipped": 1.0, "fault/consecutive": float(self.bad_steps)}
            if self.bad_steps >= self.cfg.faults.max_consecutive:
                writer.log(step + 1, rec)
                self.save(step + 1)
                raise TrainingFault(
                    f"{self.bad_steps} bad steps in a row, the last: {fault}. The checkpoint of step {step + 1} in "
                    f"{self.out / 'checkpoints'} holds the weights of the last good step, "
                    f"{step + 1 - self.bad_steps}; change what made the steps bad and continue with "
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
            self.last_within_bounds = done
        return within

    def _drift_stop(self, step: int) -> DriftStop:
        """monitors.stop: point `--resume` at the checkpoint of the last evaluation within bounds, draw the report."""
        good = self.last_within_bounds
        where = "no checkpoint within bounds is recorded (a run resumed from a checkpoint older than the monitors)"
        if self.rank == 0:
            if good is not None:
                where = (f"{point_latest(self.out, good)} holds the weights of step {good}, the last evaluation within "
                         f"the bounds, and is the checkpoint --resume continues from")
            self.write_report()
        D.barrier()
        beyond = "(see rank 0's message)"
        if self.monitor is not None:
            beyond = "; ".join(d.describe() for d in self.monitor.beyond)
        return DriftStop(f"reward-hacking monitors (monitors.stop): at step {step}, {beyond}. {where}: change what "
                         f"drives the drift (a lower optim.lr, a larger algorithm.beta, another reward) and continue "
                         f"with margrpo train --resume {self.out} key=value ...; see {self.out / 'report.png'}")
