"""The NOVA family (BAAI, baaivision/NOVA): text-to-image NOVA as a margrpo policy and image model.

* `model`: `NOVATransformer` (the `Policy`: upstream's `NOVATransformer3DModel` parameter names, flow head
  `NOVAFlowHead`) and `NOVAConfig`;
* `image_model`: `NOVAModel` (the `ImageModel`: + diffusers VAE + Phi text encoder) and `load`, the strict loader
  of upstream's diffusers-style folder (public entry point `margrpo.compat.nova`).
"""

from margrpo.models.nova.image_model import NOVAModel, load
from margrpo.models.nova.model import NOVAConfig, NOVAFlowHead, NOVATransformer

__all__ = ["NOVAConfig", "NOVAFlowHead", "NOVAModel", "NOVATransformer", "load"]
