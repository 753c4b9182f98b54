"""The Harmon family (wusize/Harmon): a Qwen2.5 LLM between a MAR encoder and decoder, LTH14's DDPM head, KL-16.

* `condition`: `HarmonCondition`, the prompt ids with the LLM's prompt KV cache (batched like `Condition`);
* `policy`: `HarmonPolicy` (the `Policy`);
* `model`: `HarmonImageModel` (the `ImageModel`, upstream's key names) and its HF-format folder;
* `loading`: upstream's `.pth` (+ the Qwen2.5 folder + `kl16.ckpt`), and the folder, behind one `load` (public
  entry point `margrpo.compat.harmon`).
"""

from margrpo.models.harmon.condition import HarmonCondition
from margrpo.models.harmon.model import HarmonImageModel
from margrpo.models.harmon.policy import HarmonPolicy

__all__ = ["HarmonCondition", "HarmonImageModel", "HarmonPolicy"]
