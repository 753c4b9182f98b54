"""Harmon as an `ImageModel` (wusize/Harmon): the policy (`policy.HarmonPolicy`), its prompt template and text
tokenizer, the frozen KL-16 VAE, and its HF-style folder format, written by `save_pretrained` and read by
`load_folder` (`loading.py` reads upstream's `.pth` and builds the model through the same `_assemble`).

`HarmonImageModel.state_dict()` has upstream's keys (`llm.*`, `mar.*`, `proj_in.*`, `proj_out.*`, `vae.*`) because it
registers the policy's sub-modules directly (the policy object itself is shared, not a child, so no key appears
twice). The folder: `config.json` with `llm` (a Qwen2 config dict) and `mar` (`type` = a preset, plus MAR keyword
arguments), `model.safetensors` (every key including `vae.*`, without the tied `llm.lm_head.weight`), the tokenizer
files. Loading is strict: missing, unexpected and mis-shaped keys are reported together in one error naming the
file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from margrpo.models.base import ImageModel
from margrpo.models.harmon.condition import HarmonCondition
from margrpo.models.harmon.policy import CFG_PROMPT, PROMPT_TEMPLATE, HarmonPolicy, format_prompt
from margrpo.models.mar.lth14 import MAR_PRESETS, UPSTREAM_KWARGS, count_blocks, infer_config
from margrpo.models.mar.model import MARPolicy
from margrpo.models.vae import KL16_LATENT_SCALE, AutoencoderKL
from margrpo.models.weights import WeightsMismatchError, preserves_global_rng

__all__ = ["HARMON_FORMAT", "HarmonCheckpointError", "HarmonImageModel", "is_harmon_folder", "load_folder",
           "mar_type_and_kwargs"]

HARMON_FORMAT = "harmon"
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


def mar_type_and_kwargs(mar: MARPolicy) -> tuple[str, dict[str, Any]]:
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
               mar_type: str | None, mar_kwargs: Mapping[str, Any]) -> MARPolicy:
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
        return MARPolicy(infer_config(mar_sd, args, **mar_kwargs))
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


class HarmonImageModel(ImageModel):
    """Harmon as an `ImageModel`: the policy, its text tokenizer and prompt template, and the frozen KL-16 VAE.

    `encode_images`: VAE posterior mean * `vae_scale` (0.2325) -> tokens; `decode`: tokens / `vae_scale` -> VAE
    decoder, clamped to [-1, 1] (upstream divides its argument in place; this does not).
    """

    def __init__(self, policy: HarmonPolicy, vae: AutoencoderKL, tokenizer, vae_scale: float = KL16_LATENT_SCALE):
        super().__init__()
        if vae.embed_dim * policy.mar.config.patch_size ** 2 != policy.token_embed_dim:
            raise ValueError(f"the VAE has {vae.embed_dim} latent channels, the MAR's tokens have "
                             f"{policy.token_embed_dim} values (patch {policy.mar.config.patch_size})")
        # the policy's sub-modules, registered here under upstream's names; the policy object itself is shared
        self.llm = policy.llm
        self.mar = policy.mar
        self.proj_in = policy.proj_in
        self.proj_out = policy.proj_out
        self.vae = vae
        self.vae.requires_grad_(False)
        self.vae.eval()
        object.__setattr__(self, "_policy", policy)
        self.text_tokenizer = tokenizer
        self.vae_scale = float(vae_scale)

    @property
    def policy(self) -> HarmonPolicy:
        return self._policy

    def train(self, mode: bool = True) -> HarmonImageModel:
        super().train(mode)
        self._policy.training = mode
        self.vae.eval()  # frozen, as upstream's `train` keeps it
        return self

    @property
    def image_shape(self) -> tuple[int, int]:
        return self._policy.image_shape

    @image_shape.setter
    def image_shape(self, shape: tuple[int, int]) -> None:
        self._policy.image_shape = shape

    @property
    def image_size(self) -> int:
        """Pixels per side of `decode`'s images (the grid's first side times the VAE stride and the patch)."""
        return self.image_shape[0] * self.vae.downsample_factor * self.mar.config.patch_size

    # ---------------------------------------------------------------- prompts
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Templated prompts -> right-padded ids [B, T] and mask [B, T] (upstream's `prepare_text_conditions`)."""
        ids = [self.text_tokenizer.encode(format_prompt(p), add_special_tokens=True) for p in prompts]
        t = max(len(i) for i in ids)
        out = torch.zeros(len(ids), t, dtype=torch.long)
        mask = torch.zeros(len(ids), t, dtype=torch.bool)
        for r, i in enumerate(ids):
            out[r, :len(i)] = torch.tensor(i, dtype=torch.long)
            mask[r, :len(i)] = True
        return out, mask

    def encode_prompts(self, prompts: list[str] | None) -> HarmonCondition | None:
        """Strings -> a `HarmonCondition` with the prompt prefill; None stays None (unconditional)."""
        if prompts is None:
            return None
        if isinstance(prompts, str):  # one prompt, not its characters
            prompts = [prompts]
        prompts = list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad or not prompts:
            raise TypeError(f"Harmon takes a non-empty list of string prompts; got {bad[:3] or prompts}")
        ids, mask = self.tokenize(prompts)
        return self._policy.prefill(ids, mask)

    # ---------------------------------------------------------------- images
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> tokens: the posterior mean (upstream's `mode()`) * vae_scale."""
        p = next(self.vae.parameters())
        z = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).mode() * self.vae_scale
        return self._policy.patchify(z.float())

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C] -> images [B, 3, H, W] clamped to [-1, 1]; `tokens` is left as it was."""
        p = next(self.vae.parameters())
        latents = self._policy.unpatchify(tokens) / self.vae_scale  # a new tensor: no in-place division
        return self.vae.decode(latents.to(device=p.device, dtype=p.dtype)).float().clamp(-1, 1)

    # ---------------------------------------------------------------- persistence (the HF-style folder)
    def harmon_config(self) -> dict:
        mar_type, mar_kwargs = mar_type_and_kwargs(self.mar)
        return {"format": HARMON_FORMAT, "llm": self.llm.config.to_dict(), "mar": {"type": mar_type, **mar_kwargs},
                "vae_scale": self.vae_scale, "image_shape": list(self.image_shape)}

    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> Path:
        """The HF-format folder: `config.json` (`llm`, `mar`), `model.safetensors` (every key but the tied
        `llm.lm_head.weight`), the tokenizer files."""
        from safetensors.torch import save

        from margrpo.utils.atomic import atomic_write, atomic_write_text

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.harmon_config()
        if metadata:
            cfg["metadata"] = metadata
        tied = _is_tied(self.llm)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if not (tied and k == "llm.lm_head.weight")}
        blob = save(tensors, metadata={"format": HARMON_FORMAT})
        atomic_write(path / "model.safetensors", lambda f: f.write(blob), binary=True)
        self.text_tokenizer.save_pretrained(str(path))
        atomic_write_text(path / "config.json", json.dumps(cfg, indent=2))
        return path

    @classmethod
    def load_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, **mar_kwargs) -> HarmonImageModel:
        return load_folder(path, dtype=dtype, device=device, **mar_kwargs)


def _is_tied(llm: nn.Module) -> bool:
    return llm.get_output_embeddings().weight is llm.get_input_embeddings().weight


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
