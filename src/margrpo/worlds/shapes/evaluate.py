"""Score a model on the shapes world's held-out prompts with the verifier (used by eval, pretrain, demo)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.base import ImageModel
from margrpo.sampling.config import SamplerConfig
from margrpo.sampling.sampler import sample
from margrpo.utils.rng import make_generator
from margrpo.worlds import shapes


@dataclass
class EvalResult:
    prompts: list[str]
    results: list[dict]
    summary: dict[str, dict[str, float]]
    images: torch.Tensor | None  # [N, 3, H, W] in [-1, 1]; None for results read back from a file
    seconds: float

    def table(self) -> str:
        return format_summary(self.summary)


def eval_prompt_set(per_category: int = 64, categories: Sequence[str] | None = None) -> list[str]:
    """Held-out prompts, `per_category` images for every category (each category's prompts cycled in order).

    GenEval weighs categories equally; the shapes world has 3 held-out single-object prompts but 284
    position prompts, so a plain prompt list would make the overall score a position score and the
    single-object score a 3-image coin toss. Cycling gives every category the same number of images.
    """
    out: list[str] = []
    for c in categories or shapes.CATEGORIES:
        ps = shapes.heldout_prompts(c)
        if ps:
            out.extend(ps[i % len(ps)] for i in range(per_category))
    return out


def train_prompt_set(per_category: int = 64, categories: Sequence[str] | None = None) -> list[str]:
    """Training prompts, `per_category` per category, cycled in order: in-distribution accuracy (fresh seeds)."""
    out: list[str] = []
    for c in categories or shapes.CATEGORIES:
        ps = shapes.train_prompts(c)
        if ps:
            out.extend(ps[i % len(ps)] for i in range(per_category))
    return out


@torch.no_grad()
def evaluate(model: ImageModel, prompts: list[str], sampler: SamplerConfig, seed: int = 0, batch_size: int = 64,
             progress: bool = True) -> EvalResult:
    """Sample one image per prompt (deterministic from `seed`) and score with the verifier."""
    import time

    t0 = time.perf_counter()
    dev = model.device
    all_images, results = [], []
    batches = range(0, len(prompts), batch_size)
    for k, start in enumerate(tqdm(batches, desc="eval", disable=not progress, leave=False)):
        chunk = prompts[start:start + batch_size]
        cond = model.encode_prompts(chunk)
        r = sample(model.policy, cond, len(chunk), sampler, make_generator(seed, "eval", k, device=dev))
        images = model.decode(r.tokens).float().cpu()
        all_images.append(images)
        results.extend(shapes.score_tensors(images, chunk))
    images = torch.cat(all_images) if all_images else torch.empty(0, 3, 1, 1)
    return EvalResult(prompts=list(prompts), results=results, summary=shapes.summarize(results), images=images,
                      seconds=time.perf_counter() - t0)


def paired_strict_change(before: EvalResult, after: EvalResult) -> dict[str, tuple[float, float]]:
    """Per category and "overall": (change in strict accuracy, its paired standard error).

    Why paired: before and after score the same prompts with the same seeds, so the per-image differences
    (-1, 0 or +1) carry the comparison; their standard error is what a reader needs to tell a gain from
    sampling noise. Images of one prompt are correlated (the held-out "single" category cycles 3 prompts), so
    the standard error is cluster-robust with prompts as clusters: Var = C / (C - 1) sum_c (S_c - n_c d)^2 / N^2
    for C prompts, S_c the sum of a prompt's differences and d their mean. With one image per prompt this is
    the ordinary s / sqrt(N); with 3 prompts it rests on 2 degrees of freedom and is itself uncertain.
    "overall" is the mean of the category changes (as `summarize` weighs categories), so its variance is the
    sum of the category variances over the number of categories squared. A category with fewer than two
    prompts has no standard error (nan).
    """
    if before.prompts != after.prompts:
        raise ValueError("paired change needs the same prompts before and after "
                         f"({len(before.prompts)} vs {len(after.prompts)} prompts, or a different order)")
    diffs: dict[str, dict[str, list[float]]] = {}
    for prompt, b, a in zip(before.prompts, before.results, after.results, strict=True):
        d = float(bool(a["strict"])) - float(bool(b["strict"]))
        diffs.setdefault(str(b.get("category", "unknown")), {}).setdefault(prompt, []).append(d)
    out: dict[str, tuple[float, float]] = {}
    for cat, by_prompt in diffs.items():
        clusters = [np.asarray(v) for v in by_prompt.values()]
        n = sum(len(v) for v in clusters)
        mean = float(sum(v.sum() for v in clusters) / n)
        c = len(clusters)
        if c > 1:
            var = c / (c - 1) * sum((v.sum() - len(v) * mean) ** 2 for v in clusters) / n**2
            se = float(np.sqrt(var))
        else:
            se = float("nan")
        out[cat] = (mean, se)
    if out:
        means = np.array([m for m, _ in out.values()])
        ses = np.array([se for _, se in out.values()])
        out["overall"] = (float(means.mean()), float(np.sqrt(np.square(ses).sum()) / len(ses)))
    return out


def format_summary(summary: dict[str, dict[str, float]]) -> str:
    """Markdown table: category | n | strict | partial."""
    lines = ["| category | n | strict | partial |", "|---|---:|---:|---:|"]
    order = [c for c in shapes.CATEGORIES if c in summary] + [c for c in summary if c not in shapes.CATEGORIES]
    for c in order:
        s = summary[c]
        lines.append(f"| {c} | {int(s['n'])} | {100 * s['strict']:.1f}% | {100 * s['partial']:.1f}% |")
    return "\n".join(lines)
