"""pass@k of a model per category: how often at least one of k samples of a prompt satisfies the verifier.

Why: pass@k says how much room the world leaves a policy that puts its mass on what it already sometimes draws
(pass@1 is the plain accuracy; a large pass@16 with a small pass@1 means the model can draw the right image but
rarely does).

Estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): from n samples of a prompt of
which c are correct, pass@k = 1 - C(n - c, k) / C(n, k), unbiased for k <= n; a category's pass@k is the mean over
its prompts, and its standard error the spread of the per-prompt values over the prompts (prompts are the
independent units; the samples of one prompt are not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from margrpo.models.base import ImageModel
from margrpo.sampling.config import SamplerConfig
from margrpo.utils.rng import derive_seed, numpy_rng
from margrpo.worlds import shapes
from margrpo.worlds.shapes.evaluate import EVAL_SEED, SPLITS, evaluate


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples drawn without replacement hold a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # C(n - c, k) / C(n, k) = prod_{i = n - k + 1}^{n} (1 - c / i), a product of terms in [0, 1]: no overflow
    return float(1.0 - np.prod(1.0 - c / np.arange(n - k + 1, n + 1)))


@dataclass
class PassAtK:
    """pass@k per category and k: (mean over prompts, standard error over prompts), with the prompt counts."""

    split: str
    samples_per_prompt: int
    ks: list[int]
    values: dict[str, dict[int, tuple[float, float]]]  # category -> k -> (mean, s.e.)
    prompts: dict[str, int]  # category -> number of prompts
    seconds: float

    def table(self) -> str:
        lines = ["| category | prompts | " + " | ".join(f"pass@{k}" for k in self.ks) + " |",
                 "|---|---:|" + "---:|" * len(self.ks)]
        for c, by_k in self.values.items():
            cells = [f"{100 * m:.1f}% ± {100 * se:.1f}" for m, se in (by_k[k] for k in self.ks)]
            lines.append(f"| {c} | {self.prompts[c]} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"split": self.split, "samples_per_prompt": self.samples_per_prompt, "ks": self.ks,
                "prompts": self.prompts, "seconds": self.seconds,
                "values": {c: {str(k): list(v) for k, v in by_k.items()} for c, by_k in self.values.items()}}


def category_pass_at_k(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, tuple[float, float]]:
    """Per k: (mean over prompts of pass@k, its standard error); `correct[p]` holds prompt p's samples' verdicts."""
    out = {}
    for k in ks:
        per_prompt = np.array([pass_at_k(len(v), int(sum(map(bool, v))), k) for v in correct])
        se = float(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")
        out[k] = (float(per_prompt.mean()), se)
    return out


def measure_pass_at_k(model: ImageModel, sampler: SamplerConfig, split: str = "heldout", prompts_per_category: int = 50,
                      samples_per_prompt: int = 16, ks: Sequence[int] = (1, 4, 16), seed: int = EVAL_SEED,
                      progress: bool = True) -> PassAtK:
    """pass@k per category of `split`: up to `prompts_per_category` distinct prompts per category (a seeded draw
    without replacement; held-out "single" has 3), each sampled `samples_per_prompt` times."""
    import time

    if split not in SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; valid: {', '.join(SPLITS)}")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > samples_per_prompt:
        raise ValueError(f"pass@k needs 1 <= k <= samples per prompt ({samples_per_prompt}); got k = {ks}")
    pools = shapes.heldout_prompts if split == "heldout" else shapes.train_prompts
    chosen: dict[str, list[str]] = {}
    for c in shapes.CATEGORIES:
        pool = pools(c)
        rng = numpy_rng(seed, "pass-at-k-prompts", split, c)
        idx = sorted(rng.permutation(len(pool))[:prompts_per_category])
        chosen[c] = [pool[i] for i in idx]
    prompts = [p for ps in chosen.values() for p in ps for _ in range(samples_per_prompt)]
    t0 = time.perf_counter()
    res = evaluate(model, prompts, sampler, seed=derive_seed(seed, "pass-at-k-images", split), progress=progress)
    verdicts: dict[str, list[bool]] = {}
    for p, r in zip(res.prompts, res.results, strict=True):
        verdicts.setdefault(p, []).append(bool(r["strict"]))
    values = {c: category_pass_at_k([verdicts[p] for p in ps], ks) for c, ps in chosen.items() if ps}
    return PassAtK(split, samples_per_prompt, ks, values, {c: len(ps) for c, ps in chosen.items() if ps},
                   time.perf_counter() - t0)
