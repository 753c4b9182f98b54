"""Training prompts: the shapes world's train split, a prompt file, or fixed prompts; batch k is a pure function
of (seed, rank, k), so a resumed run draws the prompts the uninterrupted one would have."""

from __future__ import annotations

import numpy as np

from margrpo.rl.config import TrainConfig
from margrpo.utils.rng import numpy_rng


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
        self.by_category: list[np.ndarray] = []
        if not self.fixed:  # a category uniformly, then a prompt of it (the shapes train split is 80% position)
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
