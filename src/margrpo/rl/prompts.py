"""Training prompts: the shapes world's train split, a prompt file, or fixed prompts; batch k is a pure function
of (seed, k), so a resumed run draws the prompts the uninterrupted one would have."""

from __future__ import annotations

import numpy as np

from margrpo.rl.config import TrainConfig
from margrpo.utils.rng import numpy_rng


def stratified_categories(n: int, num_categories: int, rng: np.random.Generator) -> list[int]:
    """The category of each of a step's `n` prompts: `n // C` rounds of every category, then `n % C` distinct
    categories drawn at random (in category order). Round-major, so consecutive slices of C (the rollout shards
    of a multi-process run, when C divides their size) hold one prompt of each category."""
    reps, rest = divmod(n, num_categories)
    extra = sorted(int(c) for c in rng.choice(num_categories, size=rest, replace=False))
    return list(range(num_categories)) * reps + extra


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

            pairs = [(q, c) for c in shapes.CATEGORIES for q in shapes.train_prompts(c)]
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
        self.balance = p.category_balance
        self.by_category: list[np.ndarray] = []
        if p.category_balance != "off" and not self.fixed:
            groups: dict = {}
            for i, m in enumerate(self.metadata):
                groups.setdefault(m.get("category"), []).append(i)
            if len(groups) > 1:
                self.by_category = [np.asarray(v) for _, v in sorted(groups.items(), key=lambda kv: str(kv[0]))]

    def batch(self, step: int, n: int, shard: int = 0, shards: int = 1) -> tuple[list[str], list[dict]]:
        """Shard `shard`'s `n` prompts of step `step`, whose global batch has `n * shards` prompts.

        Stratified: the global batch is drawn from the stream (seed, "prompts", step) and cut into the shards, so
        the categories are balanced over the whole step. Random and off (the earlier behaviour): each shard draws
        its own from (seed, "prompts", shard, step)."""
        if not 0 <= shard < shards:
            raise ValueError(f"prompt shard {shard} of {shards}: must be in [0, {shards})")
        if self.by_category and self.balance == "stratified":
            rng = numpy_rng(self.seed, "prompts", step)
            cats = stratified_categories(n * shards, len(self.by_category), rng)
            picks: dict[int, list[int]] = {}
            for c in sorted(set(cats)):
                pool = self.by_category[c]
                m = cats.count(c)
                picks[c] = [int(pool[j]) for j in rng.choice(len(pool), size=m, replace=m > len(pool))]
            idx = [picks[c].pop() for c in cats]
            idx = idx[shard * n:(shard + 1) * n]
        else:
            rng = numpy_rng(self.seed, "prompts", shard, step)
            if self.by_category:
                cs = rng.integers(len(self.by_category), size=n)
                idx = [int(self.by_category[c][rng.integers(len(self.by_category[c]))]) for c in cs]
            else:
                idx = rng.choice(len(self.prompts), size=n, replace=len(self.prompts) < n)
        return [self.prompts[i] for i in idx], [self.metadata[i] for i in idx]
