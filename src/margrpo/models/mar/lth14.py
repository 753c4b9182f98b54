"""Load LTH14/mar checkpoints (`checkpoint-last.pth`, `kl16.ckpt`) into margrpo's MAR.

Upstream saves `{"model": sd, "model_ema": sd, "args": argparse.Namespace, ...}` with `torch.save`.
We read it with `torch.load(weights_only=True)`, allow-listing only `argparse.Namespace`, so a
malicious file cannot run code. The architecture comes from the file's `args` (preset name such as
`mar_base`, image size, strides, head size, buffer) cross-checked against the state-dict shapes;
explicit keyword arguments override both. Every missing, unexpected or mis-shaped key is reported.

Public API (kept stable: an external check calls these names):
    load_checkpoint(path, ema=True, **kwargs) -> MARPolicy
    from_state_dict(state_dict, **kwargs) -> MARPolicy
    load_vae(path) -> AutoencoderKL
    convert(checkpoint, out, vae=None, ema=True, **kwargs) -> Path   (a model folder that `model:` can name)
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from margrpo.models.mar.model import MARConfig, MARPolicy
from margrpo.models.weights import WeightsMismatchError, load_state_strict, preserves_global_rng

# LTH14/mar `models/mar.py` presets: (embed dim, depth, heads) for encoder and decoder alike.
MAR_PRESETS: dict[str, dict[str, int]] = {
    "mar_base": {"embed": 768, "depth": 12, "heads": 12},
    "mar_large": {"embed": 1024, "depth": 16, "heads": 16},
    "mar_huge": {"embed": 1280, "depth": 20, "heads": 16},
}

__all__ = ["MAR_PRESETS", "UPSTREAM_KWARGS", "CheckpointError", "convert", "from_state_dict", "infer_config",
           "load_checkpoint", "load_into", "load_vae", "read_checkpoint"]

# Upstream constructor arguments we accept (anything else is an error naming the key).
UPSTREAM_KWARGS = {
    "img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio", "vae_embed_dim", "mask_ratio_min",
    "label_drop_prob", "class_num", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w",
    "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing",
}
# Fields of `args` that are architecture arguments of MAR (the rest of a training run's args is ignored). Every
# one the file carries is read; upstream's main_mar.py stores no head counts (its presets fix them), a fork may.
_ARGS_FIELDS = ("img_size", "vae_stride", "patch_size", "vae_embed_dim", "mask_ratio_min", "label_drop_prob",
                "class_num", "attn_dropout", "proj_dropout", "buffer_size", "diffloss_d", "diffloss_w",
                "num_sampling_steps", "diffusion_batch_mul", "grad_checkpointing", "encoder_embed_dim",
                "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                "mlp_ratio")


class CheckpointError(WeightsMismatchError):
    """A checkpoint that does not fit the model; the message names the file and the keys."""


def count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of `prefix.N.*` blocks in a state dict (the depth the weights have)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def infer_config(sd: Mapping[str, torch.Tensor], args: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> MARConfig:
    """MARConfig from state-dict shapes, upstream `args` (a dict) and explicit overrides (highest priority)."""
    unknown = sorted(set(kwargs) - UPSTREAM_KWARGS)
    if unknown:
        raise TypeError(f"unknown MAR argument(s) {unknown}; valid: {sorted(UPSTREAM_KWARGS)}")
    args = dict(args or {})
    need = ["z_proj.weight", "encoder_pos_embed_learned", "diffusion_pos_embed_learned", "decoder_embed.weight",
            "diffloss.net.input_proj.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a MAR state dict: missing {missing}")
    d_enc, token_dim = sd["z_proj.weight"].shape
    d_dec = sd["decoder_embed.weight"].shape[0]
    seq_len = sd["diffusion_pos_embed_learned"].shape[1]
    buffer = sd["encoder_pos_embed_learned"].shape[1] - seq_len
    cfg: dict[str, Any] = {
        "encoder_embed_dim": d_enc, "decoder_embed_dim": d_dec,
        "encoder_depth": count_blocks(sd, "encoder_blocks"), "decoder_depth": count_blocks(sd, "decoder_blocks"),
        "buffer_size": buffer, "diffloss_w": sd["diffloss.net.input_proj.weight"].shape[0],
        "diffloss_d": count_blocks(sd, "diffloss.net.res_blocks"),
    }
    if "class_emb.weight" in sd:
        cfg["class_num"] = sd["class_emb.weight"].shape[0]
    if "encoder_blocks.0.mlp.fc1.weight" in sd:
        cfg["mlp_ratio"] = sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] / d_enc
    preset = MAR_PRESETS.get(str(args.get("model", "")))
    if preset is not None:
        cfg["encoder_num_heads"] = cfg["decoder_num_heads"] = preset["heads"]
    from_weights = dict(cfg)
    for f in _ARGS_FIELDS:
        if f in args and args[f] is not None:
            cfg[f] = args[f]
    cfg.update(kwargs)
    # The weights fix widths and depths: a file or caller that says otherwise is wrong, not a choice.
    for f, v in from_weights.items():
        if f in ("encoder_num_heads", "decoder_num_heads") or cfg[f] == v:
            continue
        source = "argument" if f in kwargs else "the checkpoint's args"
        raise CheckpointError(f"{f}={cfg[f]!r} ({source}) contradicts the weights, which have {f}={v!r}")
    # Head counts cannot be read off the weights (qkv is [3 D, D] for any number of heads): they come from the
    # preset name, the file's args or the caller, never from a guess.
    for f in ("encoder_num_heads", "decoder_num_heads"):
        if f not in cfg:
            raise CheckpointError(
                f"the checkpoint does not say {f} (its args name model={args.get('model')!r}, not one of "
                f"{sorted(MAR_PRESETS)}, and carry no {f}); pass it, e.g. load_checkpoint(path, {f}=...) "
                f"(margrpo convert: --mar-arg {f}=N)")
    # Geometry: whatever was not given follows from the token count and width (upstream: stride 16, patch 1).
    cfg.setdefault("patch_size", 1)
    cfg.setdefault("vae_stride", 16)
    if "vae_embed_dim" not in cfg:
        cfg["vae_embed_dim"] = token_dim // cfg["patch_size"] ** 2
    side = int(round(seq_len**0.5))
    cfg.setdefault("img_size", side * cfg["vae_stride"] * cfg["patch_size"])
    cfg["num_sampling_steps"] = str(cfg.get("num_sampling_steps", "100"))
    config = MARConfig(**cfg)
    if config.seq_len != seq_len or config.token_dim != token_dim:
        raise CheckpointError(
            f"geometry img_size={config.img_size}, vae_stride={config.vae_stride}, patch_size={config.patch_size}, "
            f"vae_embed_dim={config.vae_embed_dim} gives {config.seq_len} tokens of {config.token_dim} dims, but the "
            f"weights have {seq_len} tokens of {token_dim} dims")
    return config


def from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "<state dict>", **kwargs: Any) -> MARPolicy:
    """Build our MAR from an upstream state dict and upstream's constructor keyword arguments."""
    args = kwargs.pop("args", None)
    config = infer_config(state_dict, args, **kwargs)
    model = MARPolicy(config)
    load_into(model, state_dict, source)
    return model


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that reports missing, unexpected and mis-shaped keys together, naming `source`."""
    try:
        load_state_strict(model, state_dict, source)
    except WeightsMismatchError as e:
        raise CheckpointError(str(e)) from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw upstream checkpoint dict, loaded without executing code (allow-list: argparse.Namespace)."""
    from margrpo.utils.safe_load import safe_torch_load

    obj = safe_torch_load(path, allow=[argparse.Namespace])
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


@preserves_global_rng
def load_checkpoint(path: str | Path, ema: bool = True, **kwargs: Any) -> MARPolicy:
    """Load `checkpoint-last.pth` (entry `model_ema` if `ema` else `model`) into our MAR, in eval mode."""
    ckpt = read_checkpoint(path)
    key = "model_ema" if ema else "model"
    if key not in ckpt:
        if "model" in ckpt and ema:
            raise CheckpointError(f"{path}: no 'model_ema' entry (keys: {sorted(ckpt)}); pass ema=False "
                                  "(margrpo convert: --no-ema)")
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            sd = ckpt  # a bare state dict
        else:
            raise CheckpointError(f"{path}: no {key!r} entry; keys: {sorted(ckpt)}")
    else:
        sd = ckpt[key]
    args = ckpt.get("args")
    args_dict = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else None)
    model = from_state_dict(sd, source=f"{path}[{key!r}]", args=args_dict, **kwargs)
    return model.eval()


def load_vae(path: str | Path, **kwargs: Any):
    """The KL-16 autoencoder from upstream's `kl16.ckpt` (see `margrpo.models.mar.kl16`)."""
    from margrpo.models.mar.kl16 import load_kl16

    return load_kl16(path, **kwargs)


def convert(checkpoint: str | Path, out: str | Path, vae: str | Path, ema: bool = True, overwrite: bool = False,
            **kwargs: Any) -> Path:
    """Write an LTH14 checkpoint and the `kl16.ckpt` its tokens decode with as a margrpo model folder
    (`config.json` + `model.safetensors`), which a training config's `model:` and `--model` accept.

    Latents are scaled by 0.2325, as upstream. The autoencoder must match the MAR's latent channels and stride
    (`vae_embed_dim`, `vae_stride`). The result is class-conditional: prompts are ImageNet class indices. An
    existing non-empty `out` is refused unless `overwrite`.
    """
    from margrpo.models.codecs import AutoencoderCodec
    from margrpo.models.mar.image_model import MARImageModel
    from margrpo.models.vae import KL16_LATENT_SCALE

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder (margrpo convert: --force "
                              "replaces its files)")
    mar = load_checkpoint(checkpoint, ema=ema, **kwargs)
    cfg = mar.config
    autoencoder = load_vae(vae)
    if (autoencoder.embed_dim, autoencoder.downsample_factor) != (cfg.vae_embed_dim, cfg.vae_stride):
        raise ValueError(f"{vae}: the autoencoder has {autoencoder.embed_dim} latent channels at stride "
                         f"{autoencoder.downsample_factor}; the MAR in {checkpoint} expects {cfg.vae_embed_dim} at "
                         f"stride {cfg.vae_stride} (vae_embed_dim, vae_stride)")
    model = MARImageModel(mar, AutoencoderCodec(autoencoder, scale=KL16_LATENT_SCALE, patch_size=cfg.patch_size))
    return model.save_pretrained(out, metadata={"converted_from": str(checkpoint), "ema": ema, "vae": str(vae)})
