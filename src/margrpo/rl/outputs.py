"""What a training run leaves for its user: in-loop evaluations, sample grids, the W&B mirror, the report and
the exported model folder(s). A mixin of `Trainer` (`rl/trainer.py`); rank 0 writes."""

from __future__ import annotations

import contextlib
import dataclasses

from margrpo.models.loading import load_model
from margrpo.rl import distributed as D
from margrpo.utils.images import make_grid, save_png
from margrpo.utils.metrics import read_metrics

REPORT_KEYS = ["reward/mean", "accuracy/strict", "loss/kl", "grad_norm", "ratio/max", "zero_signal_fraction",
               "reward/by_category/*", "accuracy/by_category/*"]
# the in-loop evaluations (eval.every): held-out and in-distribution, of the weights and of their EMA, one panel
EVAL_KEYS = ["eval*/strict"]
MONITOR_KEY = "drift / bound/*"  # `margrpo.rl.monitors.report_series`


class RunOutputsMixin:
    """Evaluation, samples, logging mirrors and the final export for `Trainer`."""

    def evaluate(self, step: int) -> dict[str, float]:
        """In-loop verifier accuracy of the policy (and of its EMA), paired with step 0 (`rl.eval_loop`)."""
        metrics = self.evaluator.evaluate(self.model, step)
        if self.ema is not None and step > 0:  # at step 0 the average is the policy itself
            with self.ema.swapped():
                metrics.update(self.evaluator.evaluate(self.model, step, tag="_ema"))
        return metrics

    def save_samples(self, step: int) -> None:
        """Rank 0's sample grid. Under DDP it samples alone (the unwrapped replica: no collectives); FSDP2's
        sharded policy needs every rank in the call, and rank 0 alone writes the file."""
        if self.rank != 0 and not self.fsdp:
            return
        from margrpo.sampling.pipeline import MARPipeline

        pipe = MARPipeline(self.model, self.cfg.sampling)
        imgs = pipe(self.sample_prompts, num_images_per_prompt=4, seed=self.cfg.seed)
        labels = [p for p in self.sample_prompts for _ in range(4)]
        if self.rank == 0:
            save_png(make_grid(imgs, nrow=8, labels=labels, upscale=3), self.out / "samples" / f"step-{step}.png")

    def write_report(self) -> list[dict]:
        """report.png from metrics.jsonl: the training curves, the in-loop evaluations and the monitors' drifts as
        shares of their bounds (+-1 marked), with a line per monitored value that went beyond. Returns the rows."""
        from margrpo.rl.monitors import report_series
        from margrpo.utils.plots import plot_report

        metrics = read_metrics(self.out)
        keys = REPORT_KEYS + (EVAL_KEYS if self.evaluator is not None else [])
        drift, notes = report_series(metrics, self.monitor.bounds) if self.monitor is not None else ([], [])
        if drift:
            keys.append(MONITOR_KEY)
        plot_report(metrics + drift, keys, self.out / "report.png", title=f"{self.out.name}", smoothing=0.6,
                    guides={MONITOR_KEY: (-1.0, 1.0)}, notes=notes)
        return metrics

    # ------------------------------------------------------------------ the loop
    def _wandb(self, resume: bool) -> list:
        """The W&B mirror of the metrics rows (`log.wandb`), on rank 0 only; none otherwise."""
        from margrpo.utils.wandb_log import WandbMirror, is_rank_zero

        lg = self.cfg.log
        if not lg.wandb or not is_rank_zero():
            return []
        return [WandbMirror(self.out, config=dataclasses.asdict(self.cfg), resume=resume)]

    def _exportable(self):
        """LoRA runs export the adapters merged into the base weights (a plain folder that loads without peft)."""
        if not self.lora:
            return contextlib.nullcontext()
        from margrpo.models.lora import merged

        return merged(self.model.policy)

    def _finish(self) -> list[dict]:
        """The report, the exported model(s); the logged rows of the training steps (rank 0 writes them)."""
        export = self.model
        if self.fsdp:  # gather the full weights (a collective) into a fresh copy of the base model on rank 0
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model.policy,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                export = load_model(self.cfg.model, "cpu")
                if self.cfg.sampling.diffusion_steps is not None:
                    export.head.set_sampling_steps(self.cfg.sampling.diffusion_steps)
                export.policy.load_state_dict(full)
        D.barrier()
        if self.rank != 0:
            D.barrier()
            return []

        metrics = self.write_report()
        with self._exportable():
            export.save_pretrained(self.out / "model", metadata={"trained_from": self.cfg.model,
                                                                 "steps": self.cfg.steps})
        if self.ema is not None:
            with self.ema.swapped(), self._exportable():
                self.model.save_pretrained(self.out / "model_ema", metadata={
                    "trained_from": self.cfg.model, "steps": self.cfg.steps, "ema_decay": self.cfg.eval.ema_decay})
        D.barrier()  # the other ranks wait for the export, so a launcher sees the run's files once all exit
        return [r for r in metrics if r["step"] > 0]  # the training steps (step 0 holds the first evaluation)


class NoWriter:
    """The metrics writer of ranks other than 0: they log nothing (rank 0 logs the global batch's metrics)."""

    def log(self, step: int, row: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
