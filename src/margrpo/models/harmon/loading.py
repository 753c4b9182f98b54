"""Load Harmon from upstream's `.pth` (+ the LLM folder + `kl16.ckpt`), or from the HF-style folder (`model.py`).

* `.pth` (wusize/harmon `harmon_{0.5b,1.5b}.pth`): a flat `{key: tensor}` read with `torch.load(weights_only=True)`;
  `llm=` is the `Qwen/Qwen2.5-*-Instruct` folder, of which only `config.json` and the tokenizer are read (every
  `llm.*` weight is in the `.pth`); `vae=` is `kl16.ckpt`, needed when the `.pth` has no `vae.*` keys (whose values
  win otherwise).
* folder: `model.load_folder` (the format `HarmonImageModel.save_pretrained` writes).

Loading is strict: missing, unexpected and mis-shaped keys are reported together in one error naming the file.
Allowed gaps: `vae.*` (from `vae=`) and `llm.lm_head.weight`, which is tied to `llm.model.embed_tokens.weight`.
The MAR architecture comes from the weights (`margrpo.models.mar.lth14.infer_config`), head counts from the preset
whose width and depth the weights have, and `mar_kwargs` (upstream MAR constructor arguments) override both.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from margrpo.models.harmon.model import (
    HARMON_FORMAT,
    HarmonCheckpointError,
    HarmonImageModel,
    _assemble,
    _load_tokenizer,
    is_harmon_folder,
    load_folder,
    mar_type_and_kwargs,
)
from margrpo.models.vae import KL16_LATENT_SCALE
from margrpo.models.weights import preserves_global_rng

__all__ = ["HarmonCheckpointError", "convert", "is_harmon_folder", "load", "load_folder", "load_pth",
           "mar_type_and_kwargs"]


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
