"""Training images of the shapes world, rendered on the fly: the data source of both pretraining stages.

Batch k is a pure function of (seed, stream, k), so a resumed run sees exactly the batches an
uninterrupted one would, and the autoencoder stage draws from its own stream without shifting the
MAR stage's data.
"""

from __future__ import annotations

import numpy as np
import torch

from margrpo.utils.rng import numpy_rng
from margrpo.worlds import shapes


def uint8_to_model_range(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1] on `device`."""
    return torch.as_tensor(images).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class ShapesBatches(torch.utils.data.IterableDataset):
    """Batch k = (uint8 images [B, 32, 32, 3], prompts) rendered from numpy_rng(seed, stream, k)."""

    def __init__(self, seed: int, batch_size: int, start: int, size: int, category_weights: dict[str, float],
                 stream: str = "data"):
        super().__init__()
        self.seed, self.batch_size, self.start, self.size, self.stream = seed, batch_size, start, size, stream
        cats = [c for c in shapes.CATEGORIES if category_weights.get(c, 0) > 0]
        w = np.array([category_weights[c] for c in cats], dtype=np.float64)
        self.cats, self.probs = cats, w / w.sum()
        self.prompts = {c: shapes.train_prompts(c) for c in cats}

    def batch(self, k: int) -> tuple[np.ndarray, list[str]]:
        rng = numpy_rng(self.seed, self.stream, k)
        cats = rng.choice(len(self.cats), size=self.batch_size, p=self.probs)
        prompts = [self.prompts[self.cats[c]][rng.integers(len(self.prompts[self.cats[c]]))] for c in cats]
        imgs = np.stack([np.asarray(shapes.render_scene(p, rng, self.size)) for p in prompts])
        return imgs, prompts

    def __iter__(self):
        k = self.start
        while True:
            yield self.batch(k)
            k += 1
