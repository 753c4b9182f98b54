"""The MAR family (Li et al. 2024; LTH14/mar): the policy, its packaging, its builder and its converters.

* `model`: `MAR` (the `Policy`: transformer + diffusion head, LTH14's parameter names) and `MARConfig`;
* `image_model`: `MARImageModel` (the `ImageModel`: MARPolicy + pixel or KL tokenizer + text encoder; margrpo's folder);
* `factory`: `ModelSpec` and `build_model` (a small text-to-image MAR from a validated spec);
* `lth14`, `kl16`: converters for LTH14's `checkpoint-last.pth` and `kl16.ckpt` (public entry points in
  `margrpo.compat`).
"""

from margrpo.models.mar.image_model import MARImageModel
from margrpo.models.mar.model import MARConfig, MARPolicy

__all__ = ["MARConfig", "MARImageModel", "MARPolicy"]
