"""Build a text-conditional MAR image model from a small, validated spec (used by `pretrain` and configs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from margrpo.models.conditioning import HashedTextEncoder
from margrpo.models.mar.image_model import MARImageModel
from margrpo.models.mar.model import MARConfig, MARPolicy


@dataclass
class ModelSpec:
    """A text-to-image MAR. Encoder and decoder share width, depth and head count.

    `codec`: "pixels" (tokens are raw pixel patches) or "autoencoder" (tokens are patches of a
    KL autoencoder's latent grid; the autoencoder is passed to `build_model`, e.g. trained by
    `margrpo pretrain` first).
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"tokenizer": "codec"}

    codec: str = field(default="pixels", metadata={"choices": ("pixels", "autoencoder")})
    img_size: int = field(default=32, metadata={"range": (8, 1024)})
    patch_size: int = field(default=8, metadata={"range": (1, 64)})
    width: int = field(default=128, metadata={"range": (8, 4096)})
    depth: int = field(default=3, metadata={"range": (1, 64)})
    num_heads: int = field(default=4, metadata={"range": (1, 64)})
    buffer_size: int = field(default=16, metadata={"range": (1, 256)})
    head: str = field(default="ddpm", metadata={"choices": ("ddpm", "flow")})
    head_width: int = field(default=256, metadata={"range": (8, 4096)})
    head_depth: int = field(default=3, metadata={"range": (1, 32)})
    diffusion_steps: int = field(default=25, metadata={"range": (1, 1000)})
    clip_denoised: bool = True
    clip_range: float = field(default=1.0, metadata={"range": (1e-6, None)})
    flow_noise_level: float = field(default=0.7, metadata={"range": (0.0, 2.0)})
    dropout: float = field(default=0.0, metadata={"range": (0.0, 0.9)})
    label_drop_prob: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    diffusion_batch_mul: int = field(default=4, metadata={"range": (1, 64)})
    condition_mode: str = field(default="buffer", metadata={"choices": ("buffer", "cross_attention")})
    text_dim: int = field(default=64, metadata={"range": (8, 4096)})
    text_depth: int = field(default=1, metadata={"range": (1, 12)})
    text_max_len: int = field(default=12, metadata={"range": (1, 256)})

    def mar_config(self, latent_channels: int = 3, latent_stride: int = 1) -> MARConfig:
        return MARConfig(
            img_size=self.img_size, vae_stride=latent_stride, patch_size=self.patch_size,
            vae_embed_dim=latent_channels,
            encoder_embed_dim=self.width, encoder_depth=self.depth, encoder_num_heads=self.num_heads,
            decoder_embed_dim=self.width, decoder_depth=self.depth, decoder_num_heads=self.num_heads,
            attn_dropout=self.dropout, proj_dropout=self.dropout, label_drop_prob=self.label_drop_prob,
            buffer_size=self.buffer_size, diffloss_d=self.head_depth, diffloss_w=self.head_width,
            num_sampling_steps=str(self.diffusion_steps), diffusion_batch_mul=self.diffusion_batch_mul,
            condition="text", condition_mode=self.condition_mode, text_dim=self.text_dim, head=self.head,
            clip_denoised=self.clip_denoised, clip_range=self.clip_range, flow_noise_level=self.flow_noise_level,
        )


def build_model(spec: ModelSpec, vocab: list[str], codec: nn.Module | None = None) -> MARImageModel:
    """A randomly initialised image model with a small learned text encoder over `vocab`.

    `codec` is required iff `spec.codec == "autoencoder"` (an `AutoencoderCodec`).
    """
    if (spec.codec == "autoencoder") != (codec is not None):
        raise ValueError(f"model.codec={spec.codec!r} needs "
                         + ("an autoencoder codec" if codec is None else "no codec argument"))
    if codec is not None and spec.img_size % (codec.stride * spec.patch_size):
        raise ValueError(f"model.img_size={spec.img_size} is not a multiple of the autoencoder stride "
                         f"{codec.stride} x model.patch_size={spec.patch_size}")
    if spec.text_max_len > spec.buffer_size and spec.condition_mode == "buffer":
        raise ValueError(f"model.text_max_len={spec.text_max_len} exceeds model.buffer_size={spec.buffer_size}; "
                         "text tokens go into the buffer")
    te = HashedTextEncoder(vocab, dim=spec.text_dim, max_len=spec.text_max_len, depth=spec.text_depth,
                           num_heads=max(1, spec.text_dim // 32))
    if codec is None:
        return MARImageModel(MARPolicy(spec.mar_config()), text_encoder=te)
    mar = MARPolicy(spec.mar_config(codec.latent_channels, codec.stride))
    return MARImageModel(mar, codec=codec, text_encoder=te)
