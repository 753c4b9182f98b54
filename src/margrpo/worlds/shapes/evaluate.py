"""Score a model on the shapes world's prompts with the verifier (used by eval, pretrain, demo, compare, in-loop).

Evaluation sets, one convention everywhere (`margrpo eval`, the demo, compare, the in-loop evaluation): split
"heldout" (prompts never trained on) and "train" (training prompts with fresh seeds, in-distribution accuracy),
`per_category` images per category, drawn from seed `eval.seed` (1234 by default): the prompts of each category
are a seeded draw over all of the category's prompts (stream ("eval-prompts", split, category)), without
replacement where the category has enough, and the images' seed is (seed, "eval-images", split). The same seed
therefore gives the same prompts and images in every tool, and another seed (`margrpo eval --seed 1235`) another
800 held-out images.

Held-out "single" has 3 prompts only: the grammar has 18 single-object kinds, and the split keeps exactly the 3
HELDOUT_KINDS out of single prompts (`prompts.py`). More held-out single prompts cannot exist without moving
kinds out of the training split the shipped base was pretrained on, so its figures rest on 3 prompts, and their
standard error (clustered by prompt, 2 degrees of freedom) is itself uncertain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from margrpo.models.base import ImageModel
from margrpo.sampling.config import SamplerConfig
from margrpo.sampling.sampler import sample
from margrpo.utils.rng import derive_seed, make_generator, numpy_rng
from margrpo.worlds import shapes

EVAL_SEED = 1234  # the default of eval.seed and `margrpo eval --seed`
SPLITS = ("heldout", "train")


@dataclass
class EvalResult:
    prompts: list[str]
    results: list[dict]
    summary: dict[str, dict[str, float]]
    images: torch.Tensor | None  # [N, 3, H, W] in [-1, 1]; None for results read back from a file
    seconds: float

    def table(self) -> str:
        return format_summary(self.summary)

    def to_json(self) -> dict:
        """The per-image verdicts (what paired comparisons read back), without the images."""
        return {"prompts": list(self.prompts), "results": [
            {"strict": bool(r["strict"]), "partial": float(r["partial"]), "category": str(r["category"])}
            for r in self.results]}

    @classmethod
    def from_json(cls, data: dict) -> EvalResult:
        """Inverse of `to_json` (summary recomputed, no images)."""
        try:
            prompts, results = list(data["prompts"]), list(data["results"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"an evaluation record needs 'prompts' and 'results' (got {type(data).__name__} "
                             f"without {e})") from None
        if len(prompts) != len(results):
            raise ValueError(f"an evaluation record has {len(prompts)} prompts but {len(results)} results")
        return cls(prompts=prompts, results=results, summary=shapes.summarize(results), images=None, seconds=0.0)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation split: its prompts (a seeded draw per category) and the seed of its images."""

    split: str
    prompts: tuple[str, ...]
    seed: int


def draw_covering(pool: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` prompts of `pool` that cover it: without replacement when `n <= len(pool)`; otherwise every prompt
    `n // len(pool)` times and the rest without replacement. Returned in the pool's order."""
    if not pool or n <= 0:
        return []
    reps, rest = divmod(n, len(pool))
    counts = np.full(len(pool), reps, dtype=np.int64)
    counts[rng.permutation(len(pool))[:rest]] += 1
    return [p for p, c in zip(pool, counts, strict=True) for _ in range(int(c))]


def eval_set(split: str, per_category: int, seed: int = EVAL_SEED,
             categories: Sequence[str] | None = None) -> EvalSet:
    """`per_category` images per category of `split` ("heldout" or "train"), drawn from `seed` (module docstring).

    GenEval weighs categories equally; the shapes world has 3 held-out single-object prompts but 284 position
    prompts, so a plain prompt list would make the overall score a position score. Drawing the same number per
    category, across all of its prompts (not the first ones in the grammar's order), keeps every category's
    variety in the set.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; valid: {', '.join(SPLITS)}")
    pools = shapes.heldout_prompts if split == "heldout" else shapes.train_prompts
    out: list[str] = []
    for c in categories or shapes.CATEGORIES:
        out += draw_covering(pools(c), per_category, numpy_rng(seed, "eval-prompts", split, c))
    return EvalSet(split, tuple(out), derive_seed(seed, "eval-images", split))


def eval_sets(per_category: int, seed: int = EVAL_SEED, splits: Sequence[str] = SPLITS) -> dict[str, EvalSet]:
    """The evaluation splits of one seed, by name."""
    return {s: eval_set(s, per_category, seed) for s in splits}


def eval_prompt_set(per_category: int = 64, categories: Sequence[str] | None = None,
                    seed: int = EVAL_SEED) -> list[str]:
    """The held-out prompts of `eval_set("heldout", ...)`."""
    return list(eval_set("heldout", per_category, seed, categories).prompts)


def train_prompt_set(per_category: int = 64, categories: Sequence[str] | None = None,
                     seed: int = EVAL_SEED) -> list[str]:
    """The training prompts of `eval_set("train", ...)` (in-distribution accuracy, fresh seeds)."""
    return list(eval_set("train", per_category, seed, categories).prompts)


@torch.no_grad()
def evaluate(model: ImageModel, prompts: Sequence[str], sampler: SamplerConfig, seed: int = 0, batch_size: int = 64,
             progress: bool = True) -> EvalResult:
    """Sample one image per prompt (deterministic from `seed`) and score with the verifier."""
    import time

    t0 = time.perf_counter()
    prompts = list(prompts)
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
    return EvalResult(prompts=prompts, results=results, summary=shapes.summarize(results), images=images,
                      seconds=time.perf_counter() - t0)


def evaluate_set(model: ImageModel, eval_set: EvalSet, sampler: SamplerConfig, progress: bool = True) -> EvalResult:
    """`evaluate` on an evaluation split with its own image seed."""
    return evaluate(model, eval_set.prompts, sampler, seed=eval_set.seed, progress=progress)


def clustered_means(prompts: Sequence[str], categories: Sequence[str],
                    values: Sequence[float]) -> dict[str, tuple[float, float]]:
    """Per category and "overall": (mean of `values`, its standard error with prompts as clusters).

    Images of one prompt are correlated (the held-out "single" category has 3 prompts), so the standard error is
    cluster-robust: Var = C / (C - 1) sum_c (S_c - n_c m)^2 / N^2 for C prompts, S_c the sum of a prompt's values
    and m their mean. With one image per prompt this is the ordinary s / sqrt(N); with 3 prompts it rests on 2
    degrees of freedom and is itself uncertain. "overall" is the mean of the category means (as `summarize`
    weighs categories), so its variance is the sum of the category variances over the number of categories
    squared. A category with fewer than two prompts has no standard error (nan).
    """
    by_cat: dict[str, dict[str, list[float]]] = {}
    for prompt, cat, v in zip(prompts, categories, values, strict=True):
        by_cat.setdefault(str(cat), {}).setdefault(prompt, []).append(float(v))
    out: dict[str, tuple[float, float]] = {}
    for cat, by_prompt in by_cat.items():
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


def strict_accuracy(result: EvalResult) -> dict[str, tuple[float, float]]:
    """Per category and "overall": (strict accuracy, its standard error clustered by prompt)."""
    return clustered_means(result.prompts, [r.get("category", "unknown") for r in result.results],
                           [float(bool(r["strict"])) for r in result.results])


def paired_strict_change(before: EvalResult, after: EvalResult) -> dict[str, tuple[float, float]]:
    """Per category and "overall": (change in strict accuracy, its paired standard error).

    Why paired: before and after score the same prompts with the same seeds, so the per-image differences
    (-1, 0 or +1) carry the comparison; their standard error (`clustered_means`, prompts as clusters) is what a
    reader needs to tell a gain from sampling noise. Two models at different sampler settings are paired the same
    way: by prompt and image seed.
    """
    if before.prompts != after.prompts:
        raise ValueError("paired change needs the same prompts before and after "
                         f"({len(before.prompts)} vs {len(after.prompts)} prompts, or a different order)")
    diffs = [float(bool(a["strict"])) - float(bool(b["strict"])) for b, a in zip(before.results, after.results,
                                                                                  strict=True)]
    return clustered_means(before.prompts, [b.get("category", "unknown") for b in before.results], diffs)


def format_summary(summary: dict[str, dict[str, float]], accuracy: dict[str, tuple[float, float]] | None = None) -> str:
    """Markdown table: category | n | strict | partial (with `accuracy`, strict ± its clustered s.e.)."""
    lines = ["| category | n | strict | partial |", "|---|---:|---:|---:|"]
    order = [c for c in shapes.CATEGORIES if c in summary] + [c for c in summary if c not in shapes.CATEGORIES]
    for c in order:
        s = summary[c]
        strict = f"{100 * s['strict']:.1f}%"
        if accuracy is not None and c in accuracy:
            strict += f" ± {100 * accuracy[c][1]:.1f}"
        lines.append(f"| {c} | {int(s['n'])} | {strict} | {100 * s['partial']:.1f}% |")
    return "\n".join(lines)
