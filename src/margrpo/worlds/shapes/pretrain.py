"""`margrpo pretrain CONFIG`: MAR pretraining of a text-to-image model on the shapes world, rendered on the fly.

Data: every batch is rendered from `numpy_rng(seed, "data", batch_index)`, so the data stream is a pure
function of the seed and the batch index: a resumed run sees exactly the batches an uninterrupted one
would. Rendering runs in a DataLoader worker process, overlapping with the training step (on a 2-core
machine rendering and training each take about one core).

The model is trained with MAR's objective (random order, masked-token diffusion loss, condition dropout
for classifier-free guidance); an exponential moving average of the weights is kept and is what gets
evaluated and exported (as upstream MAR evaluates `model_ema`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.mar.factory import ModelSpec, build_model
from margrpo.models.mar.image_model import MARImageModel
from margrpo.sampling.config import SamplerConfig
from margrpo.utils.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from margrpo.utils.config import save_config
from margrpo.utils.images import make_grid, save_png, to_pil
from margrpo.utils.metrics import MetricsWriter
from margrpo.utils.rng import derive_seed, generator_state, make_generator, set_generator_state
from margrpo.utils.tensor_state import optimizer_state_from_tensors, optimizer_state_to_tensors
from margrpo.worlds import shapes
from margrpo.worlds.shapes.data import ShapesBatches, uint8_to_model_range
from margrpo.worlds.shapes.evaluate import eval_prompt_set, evaluate, format_summary
from margrpo.worlds.shapes.pretrain_autoencoder import AutoencoderSpec, train_autoencoder


@dataclass
class EvalSpec:
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"cfg": "guidance_scale", "cfg_schedule": "guidance_schedule"}

    per_category: int = field(default=32, metadata={"range": (1, 100000)})
    ar_steps: int = field(default=16, metadata={"range": (1, 4096)})
    guidance_scale: float = field(default=3.0, metadata={"range": (1.0, 50.0)})
    guidance_schedule: str = field(default="linear", metadata={"choices": ("linear", "constant")})
    temperature: float = field(default=1.0, metadata={"range": (0.01, 10.0)})

    def sampler(self) -> SamplerConfig:
        return SamplerConfig(ar_steps=self.ar_steps, diffusion_steps=None, guidance_scale=self.guidance_scale,
                             guidance_schedule=self.guidance_schedule, temperature=self.temperature)


@dataclass
class PretrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    autoencoder: AutoencoderSpec | None = None  # required iff model.codec == "autoencoder"
    eval: EvalSpec = field(default_factory=EvalSpec)
    out_dir: str = "runs/pretrain"
    seed: int = 0
    steps: int = field(default=4000, metadata={"range": (1, 10_000_000)})
    batch_size: int = field(default=64, metadata={"range": (1, 65536)})
    lr: float = field(default=1e-3, metadata={"range": (0.0, 1.0)})
    weight_decay: float = field(default=0.02, metadata={"range": (0.0, 10.0)})
    warmup_steps: int = field(default=200, metadata={"range": (0, 10_000_000)})
    min_lr_ratio: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    # Cosine cycles with warm restarts (SGDR): each cycle re-warms and decays again. None = one cycle
    # over all steps. A run extended by whole cycles passes through exactly the states of the shorter run.
    lr_cycle_steps: int | None = field(default=None, metadata={"range": (1, 10_000_000)})
    grad_clip: float = field(default=1.0, metadata={"range": (0.0, None)})
    ema_decay: float = field(default=0.999, metadata={"range": (0.0, 1.0)})
    category_weights: dict[str, float] = field(
        default_factory=lambda: {"single": 1.0, "colour_attr": 1.0, "counting": 1.0, "position": 1.0},
        metadata={"range": (0.0, None)})
    log_every: int = field(default=50, metadata={"range": (1, None)})
    eval_every: int = field(default=1000, metadata={"range": (1, None)})
    checkpoint_every: int = field(default=500, metadata={"range": (1, None)})
    keep_checkpoints: int = field(default=2, metadata={"range": (1, None)})
    data_workers: int = field(default=1, metadata={"range": (0, 64)})
    threads: int = field(default=1, metadata={"range": (0, 256)})
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = set(self.category_weights) - set(shapes.CATEGORIES)
        if unknown:
            raise ValueError(f"category_weights has unknown categories {sorted(unknown)}; valid: {shapes.CATEGORIES}")
        if sum(self.category_weights.values()) <= 0:
            raise ValueError("category_weights must have a positive sum")
        if (self.model.codec == "autoencoder") != (self.autoencoder is not None):
            raise ValueError("the 'autoencoder' section is required when model.codec is 'autoencoder' and "
                             f"would do nothing otherwise; model.codec is {self.model.codec!r}")


def vocabulary() -> list[str]:
    """Every word of the shapes grammar (train and held-out prompts: held-out combos, not held-out words)."""
    import re

    words = set()
    for p in shapes.all_prompts():
        words.update(re.findall(r"[a-z]+", p.lower()))
    return sorted(words)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio * lr, restarted every lr_cycle_steps."""
    cycle = cfg.lr_cycle_steps or cfg.steps
    pos = step % cycle if cfg.lr_cycle_steps else step
    if pos < cfg.warmup_steps:
        return cfg.lr * (pos + 1) / cfg.warmup_steps
    progress = (pos - cfg.warmup_steps) / max(1, cycle - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> MARImageModel:
    """Train; returns the EMA model. Writes config, metrics, samples, checkpoints and `model/` under out_dir."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    dev = torch.device(cfg.device)
    codec = None
    if cfg.autoencoder is not None:
        codec = train_autoencoder(cfg.autoencoder, img_size=cfg.model.img_size, seed=cfg.seed, out_dir=out,
                                  category_weights=cfg.category_weights, device=dev, progress=progress)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(derive_seed(cfg.seed, "pretrain", "init"))
        model = build_model(cfg.model, vocabulary(), codec).to(dev)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # not a frozen codec
    decay, no_decay = [], []
    for name, p in trainable:
        (no_decay if p.ndim < 2 or "pos_embed" in name or "fake_latent" in name or "mask_token" in name
         else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    torch_gen = make_generator(cfg.seed, "pretrain", device=dev)
    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        tensors, state = load_checkpoint(ckpt, device=dev)
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], state["optimizer"]))
        set_generator_state(torch_gen, state["torch_generator"])
        start = int(state["step"])
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoints'}")
    writer = MetricsWriter(out, resume_step=start if ckpt is not None else None, overwrite=ckpt is None)
    data = ShapesBatches(cfg.seed, cfg.batch_size, start, cfg.model.img_size, cfg.category_weights)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.data_workers,
                                         prefetch_factor=4 if cfg.data_workers else None)
    eval_prompts = eval_prompt_set(cfg.eval.per_category)
    model.train()
    t0 = time.perf_counter()
    it = iter(loader)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="pretrain", disable=not progress)
    losses: list[float] = []
    for step in bar:
        imgs, prompts = next(it)
        images = uint8_to_model_range(imgs, dev)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        cond = model.encode_prompts(list(prompts))
        with torch.no_grad():
            tokens = model.encode_images(images, generator=torch_gen)
        loss = model.policy.pretrain_loss(tokens, cond, torch_gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], max_norm)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(p, 1 - d)
        losses.append(loss.item())
        done = step + 1
        if done % cfg.log_every == 0:
            rec = {"loss": float(np.mean(losses)), "grad_norm": float(gnorm), "lr": lr_at(step, cfg),
                   "steps_per_s": cfg.log_every / max(1e-9, time.perf_counter() - t0)}
            writer.log(done, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            losses, t0 = [], time.perf_counter()
        if done % cfg.eval_every == 0 or done == cfg.steps:
            res = evaluate(ema, eval_prompts, cfg.eval.sampler(), seed=cfg.seed, progress=False)
            writer.log(done, {f"eval/{c}/strict": v["strict"] for c, v in res.summary.items()})
            pick = list(range(0, len(eval_prompts), max(1, len(eval_prompts) // 32)))[:32]
            grid = make_grid(to_pil(res.images[pick]), nrow=8, labels=[eval_prompts[i] for i in pick], upscale=3)
            save_png(grid, out / "samples" / f"step-{done}.png")
            (out / "eval.json").write_text(json.dumps({"step": done, "summary": res.summary}, indent=2))
            tqdm.write(f"step {done}: held-out strict accuracy\n{format_summary(res.summary)}")
            t0 = time.perf_counter()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            tens, meta = optimizer_state_to_tensors(opt.state_dict())
            save_checkpoint(out, done, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": tens},
                            {"optimizer": meta, "torch_generator": generator_state(torch_gen)},
                            keep_last=cfg.keep_checkpoints)
    writer.close()
    ema.save_pretrained(out / "model", metadata={"pretrain_steps": cfg.steps, "seed": cfg.seed})
    return ema
