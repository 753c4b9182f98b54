"""The MAR family's `ImageModel`: a MAR policy packaged with what turns prompts into conditions and tokens into images.

`MARImageModel` = MAR transformer + diffusion head (the policy, `.mar`) + image codec (`.codec`: pixels or a KL
autoencoder, `models/codecs.py`) + optional text encoder. It saves to and loads from a folder: `config.json`
(architecture, codec and text-encoder specs, format version) and `model.safetensors` (all weights, prefixed `mar.` /
`text_encoder.` / `tokenizer.`). The folder names the codec `tokenizer` (its key and weight prefix since format
version 1), so folders written before the codec's rename load as they are.
No pickle is involved in either direction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from margrpo.models.base import ImageModel
from margrpo.models.codecs import AutoencoderCodec, PixelCodec
from margrpo.models.conditioning import Condition, HashedTextEncoder, TextEncoder
from margrpo.models.mar.model import MARConfig, MARPolicy
from margrpo.models.vae import AutoencoderKL
from margrpo.models.weights import load_state_strict, preserves_global_rng
from margrpo.utils.atomic import atomic_write, atomic_write_text

FORMAT = "margrpo-generator"
FORMAT_VERSION = 1


class MARImageModel(ImageModel):
    def __init__(self, mar: MARPolicy, codec: nn.Module | None = None, text_encoder: TextEncoder | None = None):
        super().__init__()
        self.mar = mar
        self.codec = codec if codec is not None else PixelCodec()
        self.text_encoder = text_encoder
        if mar.config.condition == "text" and text_encoder is None:
            raise ValueError("a text-conditional MAR needs a text encoder")

    @property
    def policy(self) -> MARPolicy:
        """The MAR transformer and its head (stored as `mar`: the folder's and checkpoints' key prefix)."""
        return self.mar

    @property
    def image_size(self) -> int:
        return self.mar.config.img_size

    def encode_prompts(self, prompts: list[str] | list[int] | torch.Tensor | None) -> Condition | None:
        """Strings through the text encoder, or class labels; None = unconditional."""
        if prompts is None:
            return None
        dev = self.device
        if self.mar.config.condition == "class":
            labels = prompts if isinstance(prompts, torch.Tensor) else torch.tensor([int(p) for p in prompts])
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.mar.config.class_num):
                raise ValueError(f"class labels must be in [0, {self.mar.config.class_num}), got {labels.tolist()}")
            return Condition(labels=labels.to(dev))
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"a text-conditional model takes string prompts; got {bad[:3]}")
        return self.text_encoder.encode(list(prompts), dev)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C] -> images [B, 3, H, W] in [-1, 1] (an autoencoder's output is clamped)."""
        return self.codec.decode(self.mar.unpatchify(tokens)).clamp(-1, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> tokens [B, L, C]."""
        return self.mar.patchify(self.codec.encode(images, generator=generator))

    # ------------------------------------------------------------------ persistence
    def spec(self) -> dict:
        te = self.text_encoder
        te_spec = None
        if isinstance(te, HashedTextEncoder):
            te_spec = {"type": "hashed", "vocab": te.vocab, "dim": te.dim, "max_len": te.max_len,
                       "depth": len(te.encoder.layers), "num_heads": te.encoder.layers[0].self_attn.num_heads}
        elif te is not None:
            te_spec = {"type": type(te).__name__, "max_len": te.max_len}
        codec_spec = self.codec.spec() if hasattr(self.codec, "spec") else {"type": type(self.codec).__name__}
        return {"format": FORMAT, "version": FORMAT_VERSION, "mar": self.mar.config.to_dict(),
                "tokenizer": codec_spec, "text_encoder": te_spec}

    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        spec = self.spec()
        if metadata:
            spec["metadata"] = metadata
        tensors = _prefixed_state(self.mar, "mar.")
        if isinstance(self.text_encoder, HashedTextEncoder):
            tensors.update(_prefixed_state(self.text_encoder, "text_encoder."))
        if isinstance(self.codec, AutoencoderCodec):
            tensors.update(_prefixed_state(self.codec, "tokenizer."))
        blob = save(tensors, metadata={"format": FORMAT})
        atomic_write(path / "model.safetensors", lambda f: f.write(blob), binary=True)
        atomic_write_text(path / "config.json", json.dumps(spec, indent=2))
        return path

    @classmethod
    @preserves_global_rng
    def load_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> MARImageModel:
        """The folder `save_pretrained` (or a converter) wrote, strictly, in eval mode on `device`."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: no model config here (expected config.json + model.safetensors)")
        try:
            spec = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e}); a model folder's config.json is written by "
                             "save_pretrained or a margrpo converter") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object, got {type(spec).__name__}")
        if spec.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format {spec.get('format')!r} is not {FORMAT!r}")
        missing = [k for k in ("version", "mar", "tokenizer", "text_encoder") if k not in spec]
        if missing:
            raise ValueError(f"{cfg_file}: missing key(s) {missing}; a model folder's config.json names its format "
                             "version, 'mar' (the architecture), 'tokenizer' and 'text_encoder' (null for none)")
        if not isinstance(spec["version"], int) or isinstance(spec["version"], bool):
            raise ValueError(f"{cfg_file}: 'version' must be an integer, got {spec['version']!r}")
        if spec["version"] > FORMAT_VERSION:
            raise ValueError(f"{cfg_file}: format version {spec['version']} is newer than this margrpo "
                             f"understands ({FORMAT_VERSION}); upgrade margrpo")
        mar = MARPolicy(_mar_config(spec["mar"], cfg_file))
        te = _build_text_encoder(spec["text_encoder"], cfg_file)
        codec = _build_codec(spec["tokenizer"], cfg_file)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing (a model folder holds config.json and model.safetensors)")
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e}); "
                             "margrpo writes weights as safetensors and never unpickles them") from None
        _load_prefixed(mar, tensors, "mar.", path)
        if te is not None:
            _load_prefixed(te, tensors, "text_encoder.", path)
        if isinstance(codec, AutoencoderCodec):
            _load_prefixed(codec, tensors, "tokenizer.", path)
        model = cls(mar, codec, te)
        return model.to(device).eval()  # dropout off: a loaded model computes what it computed when saved


def _mar_config(fields: object, cfg_file: Path) -> MARConfig:
    """The architecture, every field stated (a default would be a guess about what the weights were trained as)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(MARConfig)}
    if not isinstance(fields, dict):
        raise ValueError(f"{cfg_file}: key 'mar' must be an object of MARConfig fields, got {fields!r}")
    missing, unknown = sorted(names - set(fields)), sorted(set(fields) - names)
    if missing or unknown:
        raise ValueError(f"{cfg_file}: key 'mar' " + "; ".join(
            part for part in (f"lacks {missing}" if missing else "", f"has unknown fields {unknown}" if unknown else "")
            if part) + f" (valid fields: {sorted(names)})")
    try:
        return MARConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: key 'mar' is not a valid architecture ({e})") from None


def _build_text_encoder(te_spec: object, cfg_file: Path) -> TextEncoder | None:
    if te_spec is None:
        return None
    keys = ("vocab", "dim", "max_len", "depth", "num_heads")
    if not isinstance(te_spec, dict) or te_spec.get("type") != "hashed":
        kind = te_spec.get("type") if isinstance(te_spec, dict) else te_spec
        raise ValueError(f"{cfg_file}: text_encoder type {kind!r} cannot be rebuilt from config; valid: 'hashed' "
                         "(or null for a class-conditional model)")
    missing = [k for k in keys if k not in te_spec]
    if missing:
        raise ValueError(f"{cfg_file}: key 'text_encoder' lacks {missing} (a hashed encoder needs {list(keys)})")
    return HashedTextEncoder(*(te_spec[k] for k in keys))


def _build_codec(tok_spec: object, cfg_file: Path) -> nn.Module:
    """The image codec the folder's key `tokenizer` describes."""
    if not isinstance(tok_spec, dict):
        raise ValueError(f"{cfg_file}: key 'tokenizer' must be an object with a 'type' ('pixels' or "
                         f"'autoencoder_kl'), got {tok_spec!r}")
    kind = tok_spec.get("type")
    if kind == "pixels":
        return PixelCodec()
    if kind == "autoencoder_kl":
        try:
            vae = AutoencoderKL(**tok_spec["config"])
            return AutoencoderCodec(vae, scale=float(tok_spec["scale"]), patch_size=int(tok_spec["patch_size"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{cfg_file}: key 'tokenizer' is not a valid autoencoder_kl spec ({e!r}); it needs "
                             "'config' (AutoencoderKL arguments), 'scale' and 'patch_size'") from e
    raise ValueError(f"{cfg_file}: codec (key 'tokenizer') type {kind!r} cannot be rebuilt from this folder; "
                     "valid: 'pixels', 'autoencoder_kl'")


def _prefixed_state(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    load_state_strict(module, sd, f"{path / 'model.safetensors'} [{prefix}*]")
