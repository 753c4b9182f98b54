"""The Harmon family (wusize/Harmon): a Qwen2.5 LLM between a MAR encoder and decoder, LTH14's DDPM head, KL-16.

* `condition`: `HarmonCondition`, the prompt ids with the LLM's prompt KV cache (batched like `Condition`);
* `model`: `HarmonPolicy` (the `Policy`) and `HarmonImageModel` (the `ImageModel`, upstream's key names);
* `loading`: upstream's `.pth` (+ the Qwen2.5 folder + `kl16.ckpt`) and the HF-format folder (public entry point
  `margrpo.compat.harmon`).
"""

from margrpo.models.harmon.condition import HarmonCondition
from margrpo.models.harmon.model import HarmonImageModel, HarmonPolicy

__all__ = ["HarmonCondition", "HarmonImageModel", "HarmonPolicy"]
