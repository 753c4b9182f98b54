"""Load MAR's / Harmon's `kl16.ckpt` (or a `.safetensors` export of it) into our `AutoencoderKL`.

Upstream (LTH14/mar `models/vae.py`, `AutoencoderKL.init_from_ckpt`) does
`torch.load(path, map_location="cpu")["model"]` and `load_state_dict(sd, strict=False)`, printing
missing/unexpected keys and carrying on. That silently yields a half-random tokenizer when the file is
wrong, and every latent the RL loop sees would be garbage. Here:

* the file is read with `weights_only=True` only; a pickle that needs other globals fails with an error
  naming the file and the global, and the caller must allow-list it explicitly (`safe_globals=[...]`,
  passed to `torch.serialization.safe_globals`). We never fall back to `weights_only=False`.
  A plain `{"model": state_dict}` of tensors, which is what MAR's loader expects, needs no extra
  globals, so none are allow-listed by default;
* the architecture (`ch`, `ch_mult`, `num_res_blocks`, `z_channels`, `embed_dim`, in/out channels and
  where attention sits) is inferred from tensor shapes, so tiny test checkpoints and the real one go
  through the same path; explicit keyword arguments override the inference (`num_groups` cannot be
  inferred from weights and defaults to upstream's 32);
* missing keys, shape mismatches and unknown extra keys are errors that name the file and the keys.
  Extra keys under `loss.` (LDM's LPIPS / discriminator / logvar training state, carried by LDM-style
  first-stage checkpoints) are ignored with a log note and listed in the report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from margrpo.models.vae import AutoencoderKL

__all__ = [
    "TRAINING_ONLY_PREFIXES",
    "KL16CheckpointError",
    "KL16LoadReport",
    "infer_kl16_config",
    "load_kl16",
    "load_kl16_with_report",
    "read_kl16_state_dict",
]

logger = logging.getLogger(__name__)

TRAINING_ONLY_PREFIXES: tuple[str, ...] = ("loss.",)
"""Key prefixes of training-only state (LPIPS, discriminator, learned logvar) that are safe to drop."""

_MAX_LISTED = 20


class KL16CheckpointError(ValueError):
    """The checkpoint file cannot be read safely or does not match the autoencoder it describes."""


@dataclass(frozen=True)
class KL16LoadReport:
    """What `load_kl16_with_report` did: the file, the resolved config and the keys it dropped."""

    path: str
    config: dict[str, Any]
    ignored_keys: tuple[str, ...] = field(default_factory=tuple)
    source_dtypes: tuple[str, ...] = field(default_factory=tuple)


def _fmt_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def read_kl16_state_dict(path: str | Path, *, safe_globals: Iterable[Any] = ()) -> dict[str, torch.Tensor]:
    """Read a state dict from `.ckpt`/`.pt`/`.pth` (torch pickle, weights_only) or `.safetensors`.

    Accepts `{"model": sd}` (MAR's format), `{"state_dict": sd}` (Lightning/LDM) or a bare `sd`.
    `safe_globals` is an explicit allow-list of extra classes/functions the pickle may reference.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kl16 checkpoint not found: '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        from margrpo.utils.checkpoint import CheckpointError
        from margrpo.utils.safe_load import safe_torch_load

        try:
            obj = safe_torch_load(path, allow=safe_globals)
        except CheckpointError as e:
            raise KL16CheckpointError(f"{e} (read with weights_only=True only; pass trusted classes in "
                                      "safe_globals=[...])") from e

    if isinstance(obj, Mapping):
        for container in ("model", "state_dict"):
            inner = obj.get(container)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise KL16CheckpointError(f"'{path}': expected a state dict (mapping), found {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor)))
    if bad:
        raise KL16CheckpointError(f"'{path}': entries that are not str -> Tensor: {_fmt_keys(bad)}")
    return dict(obj)


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_kl16_config(
    sd: Mapping[str, torch.Tensor], *, path: str | Path = "<state dict>", resolution: int = 256
) -> dict[str, Any]:
    """Architecture kwargs for `AutoencoderKL` deduced from key names and tensor shapes.

    Attention placement is returned as nominal resolutions (`resolution // 2**level`) because that is
    how upstream specifies it; only the level a resolution maps to matters.
    """

    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise KL16CheckpointError(f"'{path}': cannot infer the architecture, key '{key}' is missing")
        return sd[key].shape

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise KL16CheckpointError(f"'{path}': cannot infer ch_mult, encoder.down.* levels are {levels}")
    ch_mult = []
    for i in levels:
        out = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if out % ch:
            raise KL16CheckpointError(
                f"'{path}': encoder.down.{i}.block.0.conv1.weight has {out} output channels, "
                f"not a multiple of ch={ch}"
            )
        ch_mult.append(out // ch)
    num_res_blocks = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    z2 = shape("encoder.conv_out.weight")[0]
    if z2 % 2:
        raise KL16CheckpointError(f"'{path}': encoder.conv_out.weight has odd out channels {z2} (double_z)")
    enc_attn = _indices(sd, r"encoder\.down\.(\d+)\.attn\.")
    dec_attn = _indices(sd, r"decoder\.up\.(\d+)\.attn\.")
    return {
        "embed_dim": int(shape("post_quant_conv.weight")[1]),
        "ch_mult": tuple(ch_mult),
        "ch": int(ch),
        "num_res_blocks": num_res_blocks,
        "z_channels": int(z2 // 2),
        "in_channels": int(in_channels),
        "out_ch": int(shape("decoder.conv_out.weight")[0]),
        "resolution": resolution,
        "encoder_attn_resolutions": tuple(resolution // 2**i for i in enc_attn),
        "decoder_attn_resolutions": tuple(resolution // 2**i for i in dec_attn),
    }


def _check(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    path: Path,
    config: Mapping[str, Any],
) -> tuple[str, ...]:
    """Raise on any missing key / unknown key / shape mismatch; return the ignored training-only keys."""
    missing = sorted(k for k in expected if k not in sd)
    extra = sorted(k for k in sd if k not in expected)
    ignored = tuple(k for k in extra if k.startswith(TRAINING_ONLY_PREFIXES))
    unexpected = [k for k in extra if not k.startswith(TRAINING_ONLY_PREFIXES)]
    mismatched = [
        f"{k}: expected {tuple(v.shape)}, found {tuple(sd[k].shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:_MAX_LISTED]))
    if problems:
        raise KL16CheckpointError(
            f"'{path}' does not match AutoencoderKL({dict(config)}):\n  " + "\n  ".join(problems)
        )
    return ignored


def load_kl16_with_report(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    safe_globals: Iterable[Any] = (),
    **overrides: Any,
) -> tuple[AutoencoderKL, KL16LoadReport]:
    """`load_kl16`, also returning what was inferred and which training-only keys were dropped."""
    path = Path(path)
    sd = read_kl16_state_dict(path, safe_globals=safe_globals)
    config = infer_kl16_config(sd, path=path, resolution=overrides.get("resolution", 256))
    config.update(overrides)
    # Build on the meta device (no random init of ~80M params), then adopt the checkpoint tensors.
    model = AutoencoderKL(**config, device="meta")
    expected = model.state_dict()
    ignored = _check(sd, expected, path, config)
    if ignored:
        logger.info("'%s': ignoring %d training-only keys (%s...)", path, len(ignored), ignored[0])
    src_dtypes = tuple(sorted({str(sd[k].dtype) for k in expected}))
    model.load_state_dict({k: sd[k] for k in expected}, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    model.eval()
    report = KL16LoadReport(
        path=str(path), config=model.config, ignored_keys=ignored, source_dtypes=src_dtypes
    )
    return model, report


def load_kl16(
    path: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = torch.float32,
    safe_globals: Iterable[Any] = (),
    **overrides: Any,
) -> AutoencoderKL:
    """Load a KL-16 checkpoint into an `AutoencoderKL` in eval mode.

    `dtype=torch.float32` matches upstream (fp32 module, checkpoint cast on load); `dtype=None` keeps
    the checkpoint's dtype. `overrides` are `AutoencoderKL` kwargs that win over the inferred ones,
    e.g. `num_groups` for non-standard models or `resolution` if attention was specified differently.
    """
    return load_kl16_with_report(path, device=device, dtype=dtype, safe_globals=safe_globals, **overrides)[0]
