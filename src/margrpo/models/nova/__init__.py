"""The NOVA family (BAAI, baaivision/NOVA): text-to-image NOVA as a margrpo policy and image model.

* `model`: `NOVAPolicy` (the `Policy`: upstream's `NOVATransformer3DModel` parameter names, flow head
  `NOVAFlowHead`) and `NOVAConfig`;
* `image_model`: `NOVAImageModel` (the `ImageModel`: + diffusers VAE + Phi text encoder) and `load`, the strict loader
  of upstream's diffusers-style folder (public entry point `margrpo.compat.nova`).
"""

from margrpo.models.nova.image_model import NOVAImageModel, load
from margrpo.models.nova.model import NOVAConfig, NOVAFlowHead, NOVAPolicy

__all__ = ["NOVAConfig", "NOVAFlowHead", "NOVAImageModel", "NOVAPolicy", "load"]
