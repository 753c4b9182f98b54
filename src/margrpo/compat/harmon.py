"""wusize/Harmon checkpoints (`harmon_*.pth` + Qwen2.5 folder + `kl16.ckpt`, or the HF-format folder): the public
entry point of `margrpo.models.harmon.loading` (`load(checkpoint, llm=None, vae=None, *, dtype, device, **mar_kwargs)`).
"""

from margrpo.models.harmon.loading import *  # noqa: F403
from margrpo.models.harmon.loading import __all__  # noqa: F401
