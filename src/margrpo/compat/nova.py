"""NOVA's diffusers-style folders (`BAAI/nova-*`): the public entry point of `margrpo.models.nova.image_model`.

`margrpo.compat.nova.load(folder, *, flow_shift=None, dtype=torch.float32, device="cpu")`.
"""

from margrpo.models.nova.image_model import *  # noqa: F403
from margrpo.models.nova.image_model import __all__  # noqa: F401
