"""Image <-> latent-image converters that sit between pixels and the MAR model's patchify.

A tokenizer maps images in [-1, 1], [B, 3, H, W], to the "latent image" [B, C, h, w] that MAR patchifies
into tokens, and back. `PixelTokenizer` is the identity on pixels (tokens are raw pixel patches: exact,
no autoencoder to train, and the shapes verifier sees exactly what the model wrote). The KL-16 VAE
tokenizer for LTH14/Harmon checkpoints lives in `margrpo.models.vae`.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelTokenizer(nn.Module):
    """Pixels are the latents: C = 3, stride 1. Decoding clamps to the valid range [-1, 1]."""

    latent_channels = 3
    stride = 1

    def spec(self) -> dict:
        return {"type": "pixels"}

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)
