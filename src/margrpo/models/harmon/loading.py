"""Load Harmon from upstream's files: the `.pth` (+ the LLM folder + `kl16.ckpt`), or the HF-style folder.

* `.pth` (wusize/harmon `harmon_{0.5b,1.5b}.pth`): a flat `{key: tensor}` read with `torch.load(weights_only=True)`;
  `llm=` is the `Qwen/Qwen2.5-*-Instruct` folder, of which only `config.json` and the tokenizer are read (every
  `llm.*` weight is in the `.pth`); `vae=` is `kl16.ckpt`, needed when the `.pth` has no `vae.*` keys (whose values
  win otherwise).
* folder: `config.json` with `llm` (a Qwen2 config dict) and `mar` (`type` = a preset, plus MAR keyword arguments),
  `model.safetensors` (every key including `vae.*`, without the tied `llm.lm_head.weight`), the tokenizer files.

Loading is strict: missing, unexpected and mis-shaped keys are reported together in one error naming the file.
Allowed gaps: `vae.*` (from `vae=`) and `llm.lm_head.weight`, which is tied to `llm.model.embed_tokens.weight`.
The MAR architecture comes from the weights (`margrpo.models.mar.lth14.infer_config`), head counts from the preset
whose width and depth the weights have, and `mar_kwargs` (upstream MAR constructor arguments) override both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from margrpo.models.harmon.model import CFG_PROMPT, HARMON_FORMAT, PROMPT_TEMPLATE, HarmonImageModel, HarmonPolicy
from margrpo.models.mar.lth14 import MAR_PRESETS, UPSTREAM_KWARGS, count_blocks, infer_config
from margrpo.models.mar.model import MAR
from margrpo.models.vae import KL16_LATENT_SCALE, AutoencoderKL
from margrpo.models.weights import WeightsMismatchError, preserves_global_rng

__all__ = ["HarmonCheckpointError", "convert", "is_harmon_folder", "load", "load_folder", "load_pth",
           "mar_type_and_kwargs"]

LM_HEAD = "llm.lm_head.weight"
EMBED = "llm.model.embed_tokens.weight"
_LISTED = 10


class HarmonCheckpointError(WeightsMismatchError):
    """Harmon files that do not fit together; the message names the file and the keys."""


# ------------------------------------------------------------------------------------------------ helpers
def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _preset_for(mar_sd: Mapping[str, torch.Tensor]) -> str | None:
    """The upstream preset (`mar_base`/`mar_large`/`mar_huge`) whose width and depths the weights have."""
    if "z_proj.weight" not in mar_sd:
        return None
    width = mar_sd["z_proj.weight"].shape[0]
    depths = (count_blocks(mar_sd, "encoder_blocks"), count_blocks(mar_sd, "decoder_blocks"))
    for name, p in MAR_PRESETS.items():
        if p["embed"] == width and depths == (p["depth"], p["depth"]):
            return name
    return None


def mar_type_and_kwargs(mar: MAR) -> tuple[str, dict[str, Any]]:
    """`config.json["mar"]` for a MAR: the matching preset name (else "custom") and every upstream argument, so the
    folder gives the whole architecture whatever its `type`."""
    cfg = mar.config
    kwargs = {f: getattr(cfg, f) for f in sorted(UPSTREAM_KWARGS)}
    name = "custom"
    for preset, p in MAR_PRESETS.items():
        if all(kwargs[f"{part}_{k}"] == p[v] for part in ("encoder", "decoder")
               for k, v in (("embed_dim", "embed"), ("depth", "depth"), ("num_heads", "heads"))):
            name = preset
    return name, kwargs


def _build_mar(mar_sd: Mapping[str, torch.Tensor], source: str, config_kwargs: Mapping[str, Any],
               mar_type: str | None, mar_kwargs: Mapping[str, Any]) -> MAR:
    unknown = sorted(set(mar_kwargs) - UPSTREAM_KWARGS)
    if unknown:
        raise TypeError(f"unknown MAR argument(s) {unknown}; valid: {sorted(UPSTREAM_KWARGS)}")
    preset = _preset_for(mar_sd)
    if mar_type in MAR_PRESETS and preset != mar_type and not {"encoder_num_heads", "decoder_num_heads"} <= {
            *config_kwargs, *mar_kwargs}:
        raise HarmonCheckpointError(f"{source}: config says mar type {mar_type!r}, but the weights' width and depth "
                                    f"are not that preset's; give encoder_num_heads and decoder_num_heads")
    args = {"model": preset or mar_type or "", **config_kwargs}
    try:
        return MAR(infer_config(mar_sd, args, **mar_kwargs))
    except WeightsMismatchError as e:
        raise HarmonCheckpointError(f"{source} [mar.*]: {e}") from None


def _check(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], source: str,
           allowed_missing: set[str]) -> None:
    """Every problem at once: missing (beyond `allowed_missing`), unexpected and mis-shaped keys."""
    missing = sorted(k for k in expected if k not in got and k not in allowed_missing)
    unexpected = sorted(k for k in got if k not in expected)
    mismatched = [f"{k}: model {tuple(expected[k].shape)} vs file {tuple(got[k].shape)}"
                  for k in expected if k in got and expected[k].shape != got[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source}: the weights do not fit the Harmon architecture"]
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
            if keys:
                more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
                lines.append(f"  {what} ({len(keys)}): {keys[:_LISTED]}{more}")
        raise HarmonCheckpointError("\n".join(lines))


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: no readable tokenizer (tokenizer.json / vocab files): {e}") from None


def _assemble(sd: dict[str, torch.Tensor], source: str, llm_config, tokenizer, vae: AutoencoderKL | None,
              config_kwargs: Mapping[str, Any], mar_type: str | None, mar_kwargs: Mapping[str, Any],
              vae_scale: float, dtype: torch.dtype, device: torch.device | str) -> HarmonImageModel:
    """Build every piece from the shapes and configs, check the keys strictly, load, cast, eval."""
    from transformers import Qwen2ForCausalLM

    has_vae_keys = any(k.startswith("vae.") for k in sd)
    if has_vae_keys:
        from margrpo.models.mar.kl16 import infer_kl16_config

        try:
            vae = AutoencoderKL(**infer_kl16_config(_strip(sd, "vae."), path=f"{source} [vae.*]"))
        except ValueError as e:
            raise HarmonCheckpointError(str(e)) from None
    elif vae is None:
        raise HarmonCheckpointError(f"{source}: has no vae.* keys; pass vae= (the kl16.ckpt Harmon decodes with)")
    # the MAR's image geometry follows the VAE it decodes with (upstream: stride 16, patch 1)
    config_kwargs = {"vae_stride": vae.downsample_factor, **config_kwargs}
    mar = _build_mar(_strip(sd, "mar."), source, config_kwargs, mar_type, mar_kwargs)
    llm = Qwen2ForCausalLM(llm_config)
    uncond = torch.tensor(tokenizer.encode(PROMPT_TEMPLATE.format(input=CFG_PROMPT), add_special_tokens=True))
    model = HarmonImageModel(HarmonPolicy(llm, mar, uncond), vae, tokenizer, vae_scale)
    expected = model.state_dict()
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    allowed = {LM_HEAD} if tied else set()
    if not has_vae_keys:
        allowed |= {k for k in expected if k.startswith("vae.")}
    _check(expected, sd, source, allowed)
    if tied and LM_HEAD in sd and not torch.equal(sd[LM_HEAD], sd[EMBED]):
        raise HarmonCheckpointError(f"{source}: {LM_HEAD} differs from {EMBED}, but the LLM config ties them")
    full = {k: sd[k] for k in expected if k in sd}
    if tied:
        full[LM_HEAD] = sd[EMBED]
    if not has_vae_keys:
        full.update({f"vae.{k}": v for k, v in vae.state_dict().items()})
    model.load_state_dict(full, strict=True)
    return model.to(device=device, dtype=dtype).eval()


# ------------------------------------------------------------------------------------------------ public
@preserves_global_rng
def load_pth(checkpoint: str | Path, llm: str | Path | None = None, vae: str | Path | None = None, *,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             **mar_kwargs: Any) -> HarmonImageModel:
    """Upstream's `.pth` with the LLM folder (config + tokenizer only) and, unless the `.pth` has `vae.*`, kl16."""
    from transformers import AutoConfig

    from margrpo.utils.checkpoint import CheckpointError
    from margrpo.utils.safe_load import safe_torch_load

    checkpoint = Path(checkpoint)
    if llm is None:
        raise ValueError(f"{checkpoint}: a Harmon .pth needs llm= (the Qwen2.5-*-Instruct folder: its config.json "
                         "and tokenizer; its weights are in the .pth)")
    llm = Path(llm)
    if not (llm / "config.json").is_file():
        raise FileNotFoundError(f"{llm / 'config.json'}: missing (llm= is the Qwen2.5 folder)")
    try:
        sd = safe_torch_load(checkpoint)
    except CheckpointError as e:
        raise HarmonCheckpointError(str(e)) from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
        raise HarmonCheckpointError(f"{checkpoint}: expected a flat {{key: tensor}} state dict (upstream's .pth)")
    vae_model = None
    if not any(k.startswith("vae.") for k in sd):
        if vae is None:
            raise HarmonCheckpointError(f"{checkpoint}: has no vae.* keys; pass vae= (the kl16.ckpt Harmon "
                                        "decodes with)")
        from margrpo.models.mar.kl16 import load_kl16

        vae_model = load_kl16(vae)
    llm_config = AutoConfig.from_pretrained(str(llm), local_files_only=True)
    return _assemble(dict(sd), str(checkpoint), llm_config, _load_tokenizer(llm), vae_model, {}, None, mar_kwargs,
                     KL16_LATENT_SCALE, dtype, device)


def is_harmon_folder(path: str | Path) -> bool:
    """A directory whose `config.json` has a `llm` and a `mar` object (the HF format)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        spec = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(spec, dict) and isinstance(spec.get("llm"), dict) and isinstance(spec.get("mar"), dict)


@preserves_global_rng
def load_folder(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                **mar_kwargs: Any) -> HarmonImageModel:
    """The HF-format folder (what `HarmonImageModel.save_pretrained` and `convert` write)."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config

    path = Path(path)
    cfg_file = path / "config.json"
    if not is_harmon_folder(path):
        raise ValueError(f"{cfg_file}: not a Harmon config (needs 'llm' and 'mar' objects)")
    spec = json.loads(cfg_file.read_text(encoding="utf-8"))
    mar_spec = dict(spec["mar"])
    mar_type = mar_spec.pop("type", None)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (a Harmon folder holds config.json, model.safetensors and the "
                                "tokenizer files)")
    try:
        sd = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise HarmonCheckpointError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    unknown = sorted(set(mar_spec) - UPSTREAM_KWARGS)
    if unknown:
        raise ValueError(f"{cfg_file}: mar has unknown argument(s) {unknown}; valid: {sorted(UPSTREAM_KWARGS)}")
    model = _assemble(sd, str(weights), Qwen2Config.from_dict(spec["llm"]), _load_tokenizer(path), None, mar_spec,
                      mar_type, mar_kwargs, float(spec.get("vae_scale", KL16_LATENT_SCALE)), dtype, device)
    if spec.get("image_shape"):
        model.image_shape = tuple(spec["image_shape"])
    return model


def load(checkpoint: str | Path, llm: str | Path | None = None, vae: str | Path | None = None, *,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", **mar_kwargs: Any
         ) -> HarmonImageModel:
    """A Harmon model from upstream's `.pth` (+ `llm=` folder, + `vae=` kl16.ckpt) or from an HF-format folder."""
    p = Path(checkpoint)
    if p.is_dir():
        if llm is not None or vae is not None:
            raise ValueError(f"{p}: a Harmon folder carries its LLM config, tokenizer and VAE; llm=/vae= are for "
                             "a .pth")
        return load_folder(p, dtype=dtype, device=device, **mar_kwargs)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such Harmon checkpoint (.pth file or HF-format folder)")
    return load_pth(p, llm, vae, dtype=dtype, device=device, **mar_kwargs)


def convert(checkpoint: str | Path, out: str | Path, llm: str | Path | None = None, vae: str | Path | None = None,
            **mar_kwargs: Any) -> Path:
    """Write upstream's `.pth` (+ LLM folder + kl16.ckpt) as the HF-format folder, which `model:` can name."""
    model = load(checkpoint, llm, vae, **mar_kwargs)
    return model.save_pretrained(out, metadata={"converted_from": str(checkpoint), "llm": str(llm),
                                                "vae": None if vae is None else str(vae), "format": HARMON_FORMAT})
