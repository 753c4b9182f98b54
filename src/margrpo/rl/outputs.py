"""What a training run leaves for its user: sample grids, the W&B mirror, the report and the exported model
folder(s). Plain functions, each given what it writes; rank 0 writes (docs/design.md, "Distributed")."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from margrpo.models.base import ImageModel
from margrpo.models.loading import load_model
from margrpo.rl import distributed as D
from margrpo.rl.config import TrainConfig
from margrpo.rl.eval_loop import ParameterEMA
from margrpo.rl.monitors import DriftMonitor
from margrpo.utils.images import make_grid, save_png
from margrpo.utils.metrics import read_metrics

REPORT_KEYS = ["reward/mean", "accuracy/strict", "loss/kl", "grad_norm", "ratio/max", "zero_signal_fraction",
               "reward/by_category/*", "accuracy/by_category/*"]
# the in-loop evaluations (eval.every): held-out and in-distribution, of the weights and of their EMA, one panel
EVAL_KEYS = ["eval*/strict"]
MONITOR_KEY = "drift / bound/*"  # `margrpo.rl.monitors.report_series`


def sample_prompts(cfg: TrainConfig, training_prompts: list[str]) -> list[str]:
    """The prompts of the run's sample grids: the fixed ones, the shapes world's demo prompts, or the first 8."""
    if cfg.prompts.fixed:
        return list(cfg.prompts.fixed)[:8]
    if cfg.prompts.source == "shapes":
        from margrpo.worlds import shapes

        return list(shapes.DEMO_PROMPTS)
    return training_prompts[:8]


def save_samples(model: ImageModel, cfg: TrainConfig, prompts: list[str], path: Path, dist: D.DistContext,
                 fsdp: bool) -> None:
    """Rank 0's sample grid. Under DDP it samples alone (the unwrapped replica: no collectives); FSDP2's sharded
    policy needs every rank in the call, and rank 0 alone writes the file."""
    if dist.rank != 0 and not fsdp:
        return
    from margrpo.sampling.pipeline import MARPipeline

    imgs = MARPipeline(model, cfg.sampling)(prompts, num_images_per_prompt=4, seed=cfg.seed)
    labels = [p for p in prompts for _ in range(4)]
    if dist.rank == 0:
        save_png(make_grid(imgs, nrow=8, labels=labels, upscale=3), path)


def wandb_mirrors(cfg: TrainConfig, out: Path, resume: bool) -> list:
    """The W&B mirror of the metrics rows (`log.wandb`), on rank 0 only; none otherwise."""
    from margrpo.utils.wandb_log import WandbMirror, is_rank_zero

    if not cfg.log.wandb or not is_rank_zero():
        return []
    return [WandbMirror(out, config=dataclasses.asdict(cfg), resume=resume)]


def _exportable(model: ImageModel, lora: bool):
    """LoRA runs export the adapters merged into the base weights (a plain folder that loads without peft)."""
    if not lora:
        return contextlib.nullcontext()
    from margrpo.models.lora import merged

    return merged(model.policy)


def write_report(out: Path, evaluated: bool, monitor: DriftMonitor | None) -> list[dict]:
    """report.png from metrics.jsonl: the training curves, the in-loop evaluations and the monitors' drifts as shares
    of their bounds (+-1 marked), with a line per monitored value that went beyond. Returns the rows."""
    from margrpo.rl.monitors import report_series
    from margrpo.utils.plots import plot_report

    metrics = read_metrics(out)
    keys = REPORT_KEYS + (EVAL_KEYS if evaluated else [])
    drift, notes = report_series(metrics, monitor.bounds) if monitor is not None else ([], [])
    if drift:
        keys.append(MONITOR_KEY)
    plot_report(metrics + drift, keys, out / "report.png", title=f"{out.name}", smoothing=0.6,
                guides={MONITOR_KEY: (-1.0, 1.0)}, notes=notes)
    return metrics


def finish(model: ImageModel, cfg: TrainConfig, out: Path, ema: ParameterEMA | None, lora: bool, evaluated: bool,
           dist: D.DistContext, fsdp: bool, monitor: DriftMonitor | None = None) -> list[dict]:
    """The report and the exported model(s); returns the logged rows of the training steps (rank 0 writes them)."""
    export = model
    if fsdp:  # gather the full weights (a collective) into a fresh copy of the base model on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.rank == 0:
            export = load_model(cfg.model, "cpu")
            if cfg.sampling.diffusion_steps is not None:
                export.head.set_sampling_steps(cfg.sampling.diffusion_steps)
            export.policy.load_state_dict(full)
    D.barrier()
    if dist.rank != 0:
        D.barrier()
        return []

    metrics = write_report(out, evaluated, monitor)
    with _exportable(model, lora):
        export.save_pretrained(out / "model", metadata={"trained_from": cfg.model, "steps": cfg.steps})
    if ema is not None:
        with ema.swapped(), _exportable(model, lora):
            model.save_pretrained(out / "model_ema", metadata={
                "trained_from": cfg.model, "steps": cfg.steps, "ema_decay": cfg.eval.ema_decay})
    D.barrier()  # the other ranks wait for the export, so a launcher sees the run's files once all exit
    return [r for r in metrics if r["step"] > 0]  # the training steps (step 0 holds the first evaluation)


class NoWriter:
    """The metrics writer of ranks other than 0: they log nothing (rank 0 logs the global batch's metrics)."""

    def log(self, step: int, row: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
