"""Image <-> latent-image converters that sit between pixels and the MAR model's patchify.

A codec maps images in [-1, 1], [B, 3, H, W], to the "latent image" [B, C, h, w] that MAR patchifies
into tokens, and back. `PixelCodec` is the identity on pixels (tokens are raw pixel patches: exact,
no autoencoder to train, and the shapes verifier sees exactly what the model wrote). `AutoencoderCodec`
wraps a KL autoencoder (`models/vae.py`: LTH14's and Harmon's KL-16, or the shapes world's small one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from margrpo.models.vae import KL16_LATENT_SCALE, AutoencoderKL, DiagonalGaussian


class PixelCodec(nn.Module):
    """Pixels are the latents: C = 3, stride 1. Decoding clamps to the valid range [-1, 1]."""

    latent_channels = 3
    stride = 1

    def spec(self) -> dict:
        return {"type": "pixels"}

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class AutoencoderCodec(nn.Module):
    """Frozen image <-> latent map with MAR's scaling: `encode` returns `z * scale`, `decode` divides.

    Wraps any `AutoencoderKL`: LTH14's KL-16 (scale 0.2325) or the shapes world's small one (stride 8,
    scale measured after its training so that latents have unit std, as LDM and MAR choose theirs).

    Latents stay on the [B, C, h, w] grid; patchification into tokens belongs to the MAR model.
    `patch_size` is recorded only so callers can ask for `token_dim` (C * p * p) in one place.
    The autoencoder is frozen (`requires_grad_(False)`) and kept in eval mode even if a parent module
    is put in train mode, as MAR and Harmon do; gradients can still flow *through* it to the input
    if the caller does not wrap calls in `torch.no_grad()`.
    """

    def __init__(self, vae: AutoencoderKL, scale: float = KL16_LATENT_SCALE, patch_size: int = 1):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"latent scale must be a positive finite number, got {scale}")
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.patch_size = int(patch_size)
        self.vae.requires_grad_(False)
        self.vae.eval()

    def train(self, mode: bool = True) -> AutoencoderCodec:
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def latent_channels(self) -> int:
        return self.vae.embed_dim

    def spec(self) -> dict[str, Any]:
        """What `MARImageModel.save_pretrained` records to rebuild this tokenizer (weights go alongside)."""
        return {"type": "autoencoder_kl", "scale": self.scale, "patch_size": self.patch_size,
                "config": dict(self.vae.config)}

    @property
    def stride(self) -> int:
        return self.vae.downsample_factor

    @property
    def token_dim(self) -> int:
        """Width of one MAR token after the model patchifies: C * patch_size ** 2."""
        return self.vae.embed_dim * self.patch_size**2

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for an image of the given size."""
        return (self.latent_channels, height // self.stride, width // self.stride)

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """Unscaled posterior (its `.parameters` are the moments MAR's latent cache stores)."""
        p = self._param()
        return self.vae.encode(images.to(device=p.device, dtype=p.dtype))

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> scaled latents [B, C, H/stride, W/stride].

        `sample=True` draws from the posterior like MAR training; `sample=False` uses the mean.
        """
        post = self.posterior(images)
        z = post.sample(generator) if sample else post.mode()
        return z * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (approx. [-1, 1]; the caller clamps). Does not modify `latents`."""
        p = self._param()
        return self.vae.decode((latents / self.scale).to(device=p.device, dtype=p.dtype))
