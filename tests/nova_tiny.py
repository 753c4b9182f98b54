"""A tiny random NOVA written in upstream's on-disk format (diffusers-style folder), for the NOVA tests.

128 x 128 images, an 8-stride 4-channel VAE: a 16 x 16 latent, 2 x 2 patches, 64 tokens of 16 values; the video
encoder's 4 x 4 patches make a 16-token BOS frame. Architectures use names upstream does not register, described in
`_arch_specs` (diffusers ignores `_` keys). The text encoder is a 1-layer Phi built from a transformers config and
the tokenizer a word-level `tokenizers` model: both offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WORDS = ("a", "red", "green", "blue", "circle", "square", "triangle", "two", "three", "left", "of", "right", "big",
         "small")
TEXT_DIM, TEXT_LEN = 16, 8


def transformer_config(**over) -> dict:
    cfg = {
        "_class_name": "NOVATransformer3DModel", "_diffusers_version": "0.31.0",
        "image_dim": 4, "image_size": 128, "image_stride": 8, "text_token_dim": TEXT_DIM, "text_token_len": TEXT_LEN,
        "image_base_size": [8, 8], "video_base_size": [1, 4, 4], "rotary_pos_embed": False,
        "arch": ["vit_tiny_video", "vit_tiny_image", "mlp_tiny"],
        "_arch_specs": {"vit_tiny_video": {"depth": 2, "embed_dim": 32, "num_heads": 2},
                        "vit_tiny_image": {"depth": 2, "embed_dim": 32, "num_heads": 2},
                        "mlp_tiny": {"depth": 2, "embed_dim": 32}},
    }
    cfg.update(over)
    return cfg


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def write_tiny_nova(path: Path, *, seed: int = 0, shift: float = 1.0, text_encoder: bool = True, vae: bool = True,
                    state: dict[str, torch.Tensor] | None = None, **config_over) -> Path:
    """Write the folder; `state` (default: a seeded random NOVAPolicy's) is the transformer's weights."""
    from margrpo.models.nova.image_model import read_transformer_config
    from margrpo.models.nova.model import NOVAPolicy

    path = Path(path)
    (path / "transformer").mkdir(parents=True, exist_ok=True)
    (path / "transformer" / "config.json").write_text(json.dumps(transformer_config(**config_over)))
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
         "num_train_timesteps": 1000, "shift": shift}))
    if state is None:
        config, _ = read_transformer_config(path)
        torch.manual_seed(seed)  # only the module initialisers (loaders fork the global RNG: test_families.py)
        state = NOVAPolicy(config).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "transformer" /
                                                                  "diffusion_pytorch_model.safetensors"))
    if vae:
        from diffusers import AutoencoderKL

        torch.manual_seed(seed + 1)
        AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                      latent_channels=4, norm_num_groups=4, sample_size=128, scaling_factor=0.5,
                      shift_factor=0.1).save_pretrained(str(path / "vae"), safe_serialization=True)
    if text_encoder:
        from transformers import PhiConfig, PhiForCausalLM

        tok = _tokenizer()
        torch.manual_seed(seed + 2)
        phi = PhiForCausalLM(PhiConfig(vocab_size=len(WORDS) + 2, hidden_size=TEXT_DIM, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                       pad_token_id=0, bos_token_id=None, eos_token_id=None))
        phi.save_pretrained(str(path / "text_encoder"))  # keys `model.*` + `lm_head.*`, as upstream's file
        te_cfg = path / "text_encoder" / "config.json"
        te_cfg.write_text(json.dumps({**json.loads(te_cfg.read_text()), "architectures": ["PhiEncoderModel"]}))
        tok.save_pretrained(str(path / "tokenizer"))
    return path
