"""The model families the family-parametrised tests run on: each entry builds a tiny `ImageModel` and its prompts.

A new family (NOVA, Harmon) adds one entry here and inherits every test in `test_families.py`: the policy
contract, the ratio-is-1 invariant, replay against the rollout, and the batched-step equivalence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from harmon_files import load_tiny_harmon

from margrpo.models.base import ImageModel
from margrpo.models.mar import MARImageModel, MARPolicy

from conftest import randomize, tiny_mar_kwargs


@dataclass(frozen=True)
class Family:
    build: Callable[[], ImageModel]
    prompts: tuple  # two prompts of the family's kind (strings, or class labels)


def _text_mar(latent: bool = False, **spec) -> ImageModel:
    from margrpo.models.codecs import AutoencoderCodec
    from margrpo.models.mar.factory import ModelSpec, build_model
    from margrpo.models.vae import AutoencoderKL
    from margrpo.worlds.shapes.pretrain import vocabulary

    torch.manual_seed(0)  # only the module initialisers
    codec = None
    if latent:  # a KL autoencoder at stride 4 (LTH14's KL-16 layout, tiny): 8 x 8 x 4 latents, 2 x 2 patches
        codec = AutoencoderCodec(AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1,
                                               resolution=32, encoder_attn_resolutions=(),
                                               decoder_attn_resolutions=()), scale=0.5, patch_size=2)
        spec = {"codec": "autoencoder", "patch_size": 2, **spec}
    model = build_model(ModelSpec(width=32, depth=1, num_heads=2, head_width=32, head_depth=1, diffusion_steps=6,
                                  text_dim=16, **spec), vocabulary(), codec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # upstream zero-inits the head's output layers, which would hide z's effect
        for p in model.policy.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _class_mar(head: str) -> ImageModel:
    return MARImageModel(randomize(MARPolicy(**tiny_mar_kwargs(head=head, num_sampling_steps="6")), seed=1)).eval()


def _nova() -> ImageModel:
    """A tiny random NOVA written in upstream's folder format (tiny Phi + tokenizer + VAE) and loaded strictly."""
    import tempfile

    from nova_tiny import write_tiny_nova

    from margrpo.compat import nova

    with tempfile.TemporaryDirectory() as d:
        model = nova.load(write_tiny_nova(d))
    model.head.set_sampling_steps(6)
    return model


FAMILIES: dict[str, Family] = {
    "mar-text-ddpm": Family(lambda: _text_mar(), ("a red circle", "two blue squares")),
    "mar-text-flow": Family(lambda: _text_mar(head="flow"), ("a red circle", "two blue squares")),
    "mar-text-cross-attention": Family(lambda: _text_mar(condition_mode="cross_attention"),
                                       ("a red circle", "two blue squares")),
    "mar-text-kl-latents": Family(lambda: _text_mar(latent=True), ("a red circle", "two blue squares")),
    "mar-class-ddpm": Family(lambda: _class_mar("ddpm"), (1, 7)),
    "nova": Family(_nova, ("a red circle", "two blue squares")),
    # upstream's .pth + LLM folder (config + tokenizer) + kl16.ckpt, loaded strictly (tests/harmon_files.py)
    "harmon": Family(load_tiny_harmon, ("a red circle", "two blue squares")),
}
