"""The GRPO / MAR-GRPO training loop: prompts -> rollout -> rewards -> advantages -> losses -> update.

Every stage is a function of explicit inputs; the loop only wires them, logs, and checkpoints. All
randomness per step comes from generators derived from (seed, stream, step), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.

Run directory (`out_dir`): `config.yaml`, `metrics.jsonl` + TensorBoard events, `checkpoints/step-N/`
(trainable weights, optimizer, step; the frozen reference and head are not duplicated: they come from
the base model), `samples/step-N.png`, `report.png`, and `model/` (the final generator).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.generator import MARGenerator
from margrpo.rl.advantages import group_advantages
from margrpo.rl.config import TrainConfig
from margrpo.rl.eval_loop import ParameterEMA, TrainingEvaluator
from margrpo.rl.objective import ar_step_loss, policy_tokens
from margrpo.sampling.replay import batched_step_conditions
from margrpo.sampling.rollout import Rollout
from margrpo.sampling.sampler import sample
from margrpo.utils.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    save_checkpoint,
)
from margrpo.utils.config import save_config
from margrpo.utils.images import make_grid, save_png
from margrpo.utils.metrics import MetricsWriter, StepTimer, read_metrics
from margrpo.utils.rng import make_generator, numpy_rng

REPORT_KEYS = ["reward/mean", "accuracy/strict", "loss/kl", "grad_norm", "ratio/max", "zero_signal_fraction"]
EVAL_KEY = "eval/heldout/strict"


def load_model(spec: str, device: str | torch.device) -> MARGenerator:
    """A generator folder, `shipped:NAME` for a model that ships inside the package, or a training run.

    A run directory (one with ``checkpoints/``) gives its base model with the latest checkpoint's policy
    weights, so a run can be sampled and evaluated while it trains or after a crash, before it has
    exported ``model/``. Checkpoints hold only the trainable tensors (DESIGN section 5), which is why the
    base is loaded first.
    """
    if spec.startswith("shipped:"):
        from margrpo.assets import shipped_model_path

        return MARGenerator.load_pretrained(shipped_model_path(spec[len("shipped:"):]), device=device)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return _load_run(path, device)
    return MARGenerator.load_pretrained(spec, device=device)


def _load_run(run_dir: Path, device: str | torch.device) -> MARGenerator:
    from margrpo.utils.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir, verify=True)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: a training run without a complete checkpoint under "
                                f"{run_dir / 'checkpoints'} (damaged ones do not count) and no exported generator "
                                "(config.json)")
    tensors, state = load_checkpoint(ckpt, groups=["policy"], device=device, verify=False)  # verified above
    base = state.get("model")
    if not isinstance(base, str):
        raise ValueError(f"{ckpt}: state.json does not name the run's base model (key 'model')")
    gen = load_model(base, device)
    copy_policy_tensors(dict(gen.named_parameters()), tensors["policy"], f"{ckpt} (base model {base!r})")
    return gen


def copy_policy_tensors(params: dict[str, torch.nn.Parameter], policy: dict[str, torch.Tensor], source: str) -> None:
    """Copy a checkpoint's policy tensors into same-named parameters, naming `source` on any mismatch."""
    unknown = sorted(set(policy) - set(params))
    if unknown:
        raise ValueError(f"{source}: policy tensors {unknown[:5]} do not exist in the model")
    with torch.no_grad():
        for name, t in policy.items():
            if t.shape != params[name].shape:
                raise ValueError(f"{source}: policy tensor {name} has shape {tuple(t.shape)}, the model's "
                                 f"parameter has {tuple(params[name].shape)}")
            params[name].copy_(t)


def trainable_parameters(gen: MARGenerator, which: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the AR transformer ("ar"), the head ("head") or both.

    The text encoder stays frozen: conditions are computed once per rollout and stored in it.
    """
    for p in gen.parameters():
        p.requires_grad_(False)
    out = []
    for name, p in gen.mar.named_parameters():
        is_head = name.startswith("diffloss.")
        if which == "both" or (which == "head") == is_head:
            p.requires_grad_(True)
            out.append((f"mar.{name}", p))
    return out


class PromptSource:
    """Training prompts for step k, a pure function of (seed, k)."""

    def __init__(self, cfg: TrainConfig):
        p = cfg.prompts
        self.fixed = list(p.fixed) if p.fixed else None
        self.prompts: list[str]
        self.metadata: list[dict]
        if self.fixed:
            self.prompts, self.metadata = self.fixed, [{} for _ in self.fixed]
        elif p.source == "shapes":
            from margrpo.worlds import shapes

            cats = p.categories or list(shapes.CATEGORIES)
            unknown = set(cats) - set(shapes.CATEGORIES)
            if unknown:
                raise ValueError(f"prompts.categories: unknown {sorted(unknown)}; valid: {shapes.CATEGORIES}")
            pairs = [(q, c) for c in cats for q in shapes.train_prompts(c)]
            self.prompts = [q for q, _ in pairs]
            self.metadata = [{"category": c} for _, c in pairs]
        else:
            from margrpo.data.prompt_files import load_prompt_file

            recs = load_prompt_file(p.source)
            self.prompts = [r.prompt for r in recs]
            self.metadata = [dict(r.metadata, category=r.category) for r in recs]
        if not self.prompts:
            raise ValueError(f"prompts: the source {p.source!r} gave no prompts")
        self.seed = cfg.seed
        self.by_category: list[np.ndarray] = []
        if p.balance_categories and not self.fixed:
            groups: dict = {}
            for i, m in enumerate(self.metadata):
                groups.setdefault(m.get("category"), []).append(i)
            if len(groups) > 1:
                self.by_category = [np.asarray(v) for _, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]

    def batch(self, step: int, n: int, rank: int = 0) -> tuple[list[str], list[dict]]:
        rng = numpy_rng(self.seed, "prompts", rank, step)
        if self.by_category:
            cats = rng.integers(len(self.by_category), size=n)
            idx = [int(self.by_category[c][rng.integers(len(self.by_category[c]))]) for c in cats]
        else:
            idx = rng.choice(len(self.prompts), size=n, replace=len(self.prompts) < n)
        return [self.prompts[i] for i in idx], [self.metadata[i] for i in idx]


def scorable_head_steps(head, max_gain: float, guidance: float = 1.0, temperature: float = 1.0) -> list[int]:
    """Stochastic head steps whose score gain is at most `max_gain` (the others' score terms are noise).

    `guidance` is the largest guidance scale the scored density carries (the gain grows with it) and `temperature`
    the sampling temperature (the std shrinks with it)."""
    gains = {j: head.score_gain(j, guidance, temperature) for j in range(head.num_steps) if head.is_stochastic(j)}
    eligible = [j for j, g in gains.items() if g <= max_gain]
    if not eligible:
        raise ValueError(f"no head step has a score gain <= algorithm.head_step_max_gain={max_gain} at guidance "
                         f"{guidance:g} and temperature {temperature:g}; the gains of this head's stochastic steps "
                         f"are {', '.join(f'{g:.3g}' for g in gains.values()) or 'none (it has none)'}")
    return eligible


def scored_guidance(cfg: TrainConfig) -> float:
    """The largest guidance scale in the density the policy term scores (1 when only the conditional branch is)."""
    return cfg.sampling.cfg if cfg.algorithm.guidance == "rollout" else 1.0


def select_steps(cfg: TrainConfig, head, step: int, rank: int = 0
                 ) -> tuple[list[int], dict[int, list[int]], tuple[int, ...]]:
    """AR steps to score, head steps per AR step, and the AR steps the sampler must record."""
    a = cfg.algorithm
    n_ar = cfg.sampling.ar_steps
    g = make_generator(cfg.seed, "select", rank, step)
    if a.branch:
        count = 1
    else:
        count = a.ar_step_count if a.ar_step_count is not None else max(1, round(a.ar_step_fraction * n_ar))
        count = min(count, n_ar)
    ar = sorted(torch.randperm(n_ar, generator=g)[:count].tolist())
    eligible = scorable_head_steps(head, a.head_step_max_gain, scored_guidance(cfg), cfg.sampling.temperature)
    per = len(eligible) if a.head_steps_per_ar_step is None else min(a.head_steps_per_ar_step, len(eligible))
    head_steps = {i: sorted(eligible[k] for k in torch.randperm(len(eligible), generator=g)[:per].tolist())
                  for i in ar}
    record = set(ar)
    if a.consistency:
        record |= {i - 1 for i in ar if i > a.consistency_start}
    return ar, head_steps, tuple(sorted(record))


class StepFault(Exception):
    """A numerical fault inside one training step: what went wrong, where, and the offending value."""

    def __init__(self, what: str, where: str, value: float):
        self.what, self.where, self.value = what, where, value
        super().__init__(f"{what} ({value:.4g}) at {where}")

    def __reduce__(self):  # picklable, so that it crosses a process pool (margrpo compare's workers)
        return type(self), (self.what, self.where, self.value)


class TrainingFault(RuntimeError):
    """Too many bad steps in a row: the run stopped; its checkpoint holds the last good weights."""


class TrainingStopped(Exception):
    """SIGINT or SIGTERM stopped a run after a step; its checkpoint is written and `--resume` continues it."""

    def __init__(self, step: int, signum: int, out: Path):
        self.step, self.signum, self.out = step, signum, out
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written; "
                         f"continue with: margrpo train --resume {out}")

    def __reduce__(self):  # picklable, so that it crosses a process pool (margrpo compare's workers)
        return type(self), (self.step, self.signum, self.out)


class StopRequest:
    """Within its block, SIGINT and SIGTERM ask the training loop to stop after the current step.

    Why: a signal in the middle of an update would lose the step (or, in a checkpoint write, leave it to the
    atomic rename); finishing the step and checkpointing loses nothing. A second signal interrupts at once.
    Only the main thread can install handlers; elsewhere the block changes nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.out = Path(cfg.out_dir)
        self.gen = load_model(cfg.model, self.device)
        # RL never wants dropout: sampling and the loss's recomputation (including gradient checkpointing's
        # re-forward during backward) must see the same function.
        self.gen.eval()
        self.gen.mar.head.set_sampling_steps(cfg.sampling.diffusion_steps)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.params = trainable_parameters(self.gen, cfg.algorithm.train)
        self.reference = None
        if cfg.algorithm.beta > 0:
            self.reference = copy.deepcopy(self.gen.mar).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        o = cfg.optim
        params = [p for _, p in self.params]
        if o.name == "sgd":
            self.opt = torch.optim.SGD(params, lr=o.lr, momentum=o.beta1, weight_decay=o.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        from margrpo.rewards import RewardFailureGuard, build_rewards

        self.reward = build_rewards(cfg.rewards, cfg.reward_options, device=cfg.device)
        self.guard = RewardFailureGuard(cfg.max_reward_failure_fraction, min_samples=64)
        self.prompts = PromptSource(cfg)
        self.sample_prompts = self._sample_prompts()
        self.ema = ParameterEMA(self.params, cfg.eval.ema_decay) if cfg.eval.ema_decay > 0 else None
        self.evaluator = TrainingEvaluator(cfg, self.out) if cfg.eval.every > 0 else None
        self.bad_steps = 0  # consecutive steps skipped for a numerical fault
        self.ptx_data = None
        if cfg.algorithm.ptx_weight > 0:
            if cfg.prompts.source != "shapes":
                raise ValueError("algorithm.ptx_weight > 0 needs training images, which only the shapes world "
                                 f"renders; prompts.source is {cfg.prompts.source!r} (set ptx_weight: 0)")
            from margrpo.shapes_data import ShapesBatches
            from margrpo.worlds import shapes

            self.ptx_data = ShapesBatches(cfg.seed, cfg.algorithm.ptx_batch_size, 0, self.gen.mar.config.img_size,
                                          dict.fromkeys(shapes.CATEGORIES, 1.0), stream="ptx")

    def _sample_prompts(self) -> list[str]:
        if self.cfg.prompts.fixed:
            return list(self.cfg.prompts.fixed)[:8]
        if self.cfg.prompts.source == "shapes":
            from margrpo.worlds import shapes

            return list(shapes.DEMO_PROMPTS)
        return self.prompts.prompts[:8]

    # ------------------------------------------------------------------ schedule
    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return o.lr * (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            prog = (step - o.warmup_steps) / max(1, self.cfg.steps - o.warmup_steps)
            return o.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
        return o.lr

    # ------------------------------------------------------------------ one step
    def rollout(self, step: int) -> tuple[Rollout, list[str], list[dict], list[int], dict[int, list[int]]]:
        a = self.cfg.algorithm
        prompts, meta = self.prompts.batch(step, a.prompts_per_step, self.rank)
        ar, head_steps, record = select_steps(self.cfg, self.gen.mar.head, step, self.rank)
        cond = self.gen.encode_prompts(prompts)
        cond = cond.repeat_interleave(a.group_size) if cond is not None else None
        n = a.prompts_per_step * a.group_size
        with self._autocast():
            r = sample(self.gen.mar, cond, n, self.cfg.sampler(record, ar[0] if a.branch else None, head_steps),
                       make_generator(self.cfg.seed, "rollout", self.rank, step, device=self.device),
                       make_generator(self.cfg.seed, "mte", self.rank, step, device=self.device))
        r.prompts = [p for p in prompts for _ in range(a.group_size)]
        r.group = torch.arange(a.prompts_per_step).repeat_interleave(a.group_size)
        metas = [m for m in meta for _ in range(a.group_size)]
        return r, r.prompts, metas, ar, head_steps

    def ptx_loss(self, step: int) -> torch.Tensor:
        """The MAR pretraining loss on shapes-world training batch `step` (a pure function of seed and step)."""
        from margrpo.shapes_data import uint8_to_model_range

        imgs, prompts = self.ptx_data.batch(step)
        g = make_generator(self.cfg.seed, "ptx", self.rank, step, device=self.device)
        with torch.no_grad():
            cond = self.gen.encode_prompts(list(prompts))
            tokens = self.gen.encode_images(uint8_to_model_range(imgs, self.device), generator=g)
        with self._autocast():
            loss = self.gen.mar.pretrain_loss(tokens, cond, g, drop_conditions=True)
        if not torch.isfinite(loss):
            raise StepFault("non-finite pretraining (ptx) loss", f"step {step + 1}", float(loss))
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
            try:
                rollout, prompts, metas, ar_steps, head_steps = self.rollout(step)
            except FloatingPointError as e:  # the sampler refuses non-finite tokens or log-probabilities
                raise StepFault(str(e), f"step {step + 1}, the rollout", float("nan")) from e
            images = self.gen.decode(rollout.tokens).float()
        with timer("reward"):
            out = self.reward(images, prompts, metas)
            self.guard.update(out)
            adv = group_advantages(torch.nan_to_num(out.scores), rollout.group, out.valid, a.advantage_std,
                                   a.advantage_eps, clip=a.advantage_clip)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(step)
        stats: dict[str, list[float]] = {}
        grad_norms = []
        objective = a.objective()
        denominator = None
        if a.normalize == "rollout":  # kept (token, head step) pairs of the whole rollout, per scored AR step
            draws = a.noise_draws if a.estimator != "trajectory" else None
            pairs = sum(float(policy_tokens(rollout, i, adv.use, objective).sum()) * (draws or len(head_steps[i]))
                        for i in ar_steps)
            # every AR step's loss is scaled by 1 / len(ar_steps) below; this makes each pair weigh 1 / pairs
            denominator = max(pairs, 1.0) / (1 if a.update == "ar_step" else len(ar_steps))
        with timer("update"):
            old_cache: dict = {}
            batched = a.batch_ar_steps and a.update == "rollout"
            for epoch in range(a.ppo_epochs):
                self.opt.zero_grad(set_to_none=True)
                conds = ref_conds = None
                if batched:  # one transformer forward (and backward) for every scored AR step
                    with self._autocast():
                        conds = batched_step_conditions(self.gen.mar, rollout, ar_steps, a.guidance)
                    if epoch == 0 and self.reference is not None and a.beta > 0:
                        with torch.no_grad():
                            ref_conds = batched_step_conditions(self.reference, rollout, ar_steps, a.guidance)
                total = None
                for i in ar_steps:
                    with self._autocast():
                        # the forward-process estimators' draws: the same in every PPO epoch (rho = 1 before updating)
                        g = (make_generator(self.cfg.seed, "matching", self.rank, step, i, device=self.device)
                             if a.estimator != "trajectory" else None)
                        sl = ar_step_loss(self.gen.mar, self.reference, rollout, i, head_steps[i], adv.values,
                                          adv.use, objective, old_cache, first_epoch=epoch == 0, generator=g,
                                          policy_denominator=denominator,
                                          conditions=conds[i] if conds is not None else None,
                                          reference_conditions=ref_conds[i] if ref_conds is not None else None)
                    self._check_step_loss(sl, step, i, epoch)
                    scale = 1.0 if a.update == "ar_step" else 1.0 / len(ar_steps)
                    if batched:
                        total = sl.loss * scale if total is None else total + sl.loss * scale
                    else:
                        (sl.loss * scale).backward()
                    for k, v in sl.stats.items():
                        stats.setdefault(k, []).append(v)
                    if a.update == "ar_step":
                        self._add_ptx(step, stats, first=not grad_norms)
                        grad_norms.append(self._optimizer_step())
                if a.update == "rollout":
                    if total is not None:
                        total.backward()
                    self._add_ptx(step, stats, first=not grad_norms)
                    grad_norms.append(self._optimizer_step())
        rec: dict[str, float] = {k: float(np.mean(v)) for k, v in stats.items() if k not in ("ratio/max", "ratio/min")}
        if "ratio/max" in stats:
            rec["ratio/max"] = float(np.max(stats["ratio/max"]))
            rec["ratio/min"] = float(np.min(stats["ratio/min"]))
        rec.update(out.summary("reward"))
        valid = out.valid
        key = next((k for k in out.components if k.endswith("/strict")), None)
        if key is not None:
            rec["accuracy/strict"] = float(out.components[key][valid].float().mean()) if bool(valid.any()) else 0.0
        rec.update({
            "advantage/mean": float(adv.values[adv.use].mean()) if bool(adv.use.any()) else 0.0,
            "advantage/std": float(adv.values[adv.use].std()) if int(adv.use.sum()) > 1 else 0.0,
            "advantage/abs_max": float(adv.values.abs().max()),
            "zero_signal_fraction": adv.zero_signal_fraction, "reward/invalid": float(adv.invalid),
            "grad_norm": float(np.mean(grad_norms)), "grad_norm/max": float(np.max(grad_norms)),
            "lr": self.lr_at(step), "rollout/mbytes": rollout.nbytes() / 2**20,
        })
        rec.update(timer.summary(prefix="time/"))
        if self.device.type == "cuda":
            rec["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            rec["memory/peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return rec

    def _add_ptx(self, step: int, stats: dict[str, list[float]], first: bool) -> None:
        """Accumulate ptx_weight x the pretraining loss into the first optimizer step of each rollout.

        Once per rollout, not once per optimizer step: a 64-image pretraining forward/backward is as costly as
        the policy term of a whole grpo rollout, and its gradient hardly changes between PPO epochs.
        """
        if self.ptx_data is None or not first:
            return
        loss = self.ptx_loss(step)
        (self.cfg.algorithm.ptx_weight * loss).backward()
        stats.setdefault("loss/ptx", []).append(float(loss.detach()))

    def _check_step_loss(self, sl, step: int, ar_step: int, epoch: int) -> None:
        """Non-finite losses, and KL or PPO log-ratios beyond `faults.max_kl` / `faults.max_log_ratio`, are faults."""
        where = f"step {step + 1}, AR step {ar_step}, PPO epoch {epoch}"
        f = self.cfg.faults
        if not torch.isfinite(sl.loss):
            raise StepFault("non-finite loss", where, float(sl.loss.detach()))
        if f.max_kl is not None and sl.stats.get("loss/kl", 0.0) > f.max_kl:
            raise StepFault(f"KL to the reference above faults.max_kl={f.max_kl}", where, sl.stats["loss/kl"])
        if f.max_log_ratio is not None:
            keys = ("ratio/max", "ratio/min", "mte/ratio_max", "mte/ratio_min")  # MTE chains carry their own ratios
            log_ratio = max(abs(math.log(max(sl.stats.get(k, 1.0), 1e-30))) for k in keys)
            if log_ratio > f.max_log_ratio:
                raise StepFault(f"PPO log-ratio above faults.max_log_ratio={f.max_log_ratio}", where, log_ratio)

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
        if not torch.isfinite(norm):
            raise StepFault("non-finite gradient norm", "the optimizer step", float(norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return float(norm)

    # ------------------------------------------------------------------ persistence
    def save(self, step: int) -> Path:
        tens, meta = optimizer_state_to_tensors(self.opt.state_dict())
        groups = {"policy": {n: p.detach() for n, p in self.params}, "optimizer": tens}
        if self.ema is not None:
            groups["ema"] = self.ema.shadow
        return save_checkpoint(self.out, step, groups,
                               {"optimizer": meta, "model": self.cfg.model, "bad_steps": self.bad_steps,
                                "reward_guard": {
                                   "total": self.guard.total, "invalid": self.guard.invalid}},
                               keep_last=self.cfg.log.keep_checkpoints)

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
        self.bad_steps = int(state.get("bad_steps", 0))  # restored: a resume after a crash must not change the run
        if self.bad_steps >= self.cfg.faults.max_consecutive:  # the run stopped for them: the user changed something
            self.bad_steps = 0
        self.guard.total = int(state["reward_guard"]["total"])
        self.guard.invalid = int(state["reward_guard"]["invalid"])
        return int(state["step"])

    def evaluate(self, step: int) -> dict[str, float]:
        """In-loop verifier accuracy of the policy (and of its EMA), paired with step 0 (`rl.eval_loop`)."""
        metrics = self.evaluator.evaluate(self.gen, step)
        if self.ema is not None and step > 0:  # at step 0 the average is the policy itself
            with self.ema.swapped():
                metrics.update(self.evaluator.evaluate(self.gen, step, tag="_ema"))
        return metrics

    def save_samples(self, step: int) -> None:
        from margrpo.sampling.pipeline import MARPipeline

        pipe = MARPipeline(self.gen, dataclasses.replace(self.cfg.sampler(None), record=False, mte_k=0,
                                                          diffuse="to_predict"))
        imgs = pipe(self.sample_prompts, num_images_per_prompt=4, seed=self.cfg.seed)
        labels = [p for p in self.sample_prompts for _ in range(4)]
        save_png(make_grid(imgs, nrow=8, labels=labels, upscale=3), self.out / "samples" / f"step-{step}.png")

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False) -> list[dict]:
        """Train to `cfg.steps`; returns the logged rows of the training steps (metrics.jsonl less step 0)."""
        from margrpo.rewards import RewardFailure

        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and latest_checkpoint(self.out) is not None:
            raise FileExistsError(f"{self.out} already holds checkpoints of another run; pass --resume to continue "
                                  "it, or choose a new out_dir")
        start = self.restore() if resume else 0
        if not resume:
            save_config(self.cfg, self.out / "config.yaml")
        writer = MetricsWriter(self.out, tensorboard=self.cfg.log.tensorboard,
                               resume_step=start if resume else None, overwrite=not resume)
        if start == 0:
            self.save_samples(0)
            if self.evaluator is not None:
                writer.log(0, self.evaluate(0))
        bar = tqdm(range(start, self.cfg.steps), initial=start, total=self.cfg.steps, desc="train",
                   disable=not self.progress)
        stop = StopRequest()
        try:
            with stop:
                for step in bar:
                    self._run_step(step, writer, bar)
                    if stop.signum is not None:
                        done = step + 1
                        if latest_checkpoint(self.out) != self.out / "checkpoints" / f"step-{done}":
                            self.save(done)
                        writer.close()
                        raise TrainingStopped(done, stop.signum, self.out)
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
        evaluate_now = self.evaluator is not None and (done % self.cfg.eval.every == 0 or done == self.cfg.steps)
        if evaluate_now:
            rec.update(self.evaluate(done))
        if done % self.cfg.log.log_every == 0 or done == self.cfg.steps or evaluate_now:
            writer.log(done, rec)
        bar.set_postfix(reward=f"{rec.get('reward/mean', float('nan')):.3f}", kl=f"{rec.get('loss/kl', 0):.2e}")
        if done % self.cfg.log.sample_every == 0 or done == self.cfg.steps:
            self.save_samples(done)
        if done % self.cfg.log.checkpoint_every == 0 or done == self.cfg.steps:
            self.save(done)

    def _finish(self) -> list[dict]:
        """The report, the exported model(s); the logged rows of the training steps."""
        from margrpo.utils.plots import plot_report

        metrics = read_metrics(self.out)
        keys = REPORT_KEYS + ([EVAL_KEY, f"eval_ema/{EVAL_KEY[5:]}"] if self.evaluator is not None else [])
        plot_report(metrics, keys, self.out / "report.png", title=f"{self.out.name}", smoothing=0.6)
        self.gen.save_pretrained(self.out / "model", metadata={"trained_from": self.cfg.model,
                                                               "steps": self.cfg.steps})
        if self.ema is not None:
            with self.ema.swapped():
                self.gen.save_pretrained(self.out / "model_ema", metadata={
                    "trained_from": self.cfg.model, "steps": self.cfg.steps, "ema_decay": self.cfg.eval.ema_decay})
        return [r for r in metrics if r["step"] > 0]  # the training steps (step 0 holds the first evaluation)
