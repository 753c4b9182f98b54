"""NOVA as a margrpo `ImageModel`, loaded from (and saved to) the diffusers-style folder upstream publishes.

Folder (e.g. `BAAI/nova-d48w1024-sd512`):

* `transformer/config.json` + `transformer/diffusion_pytorch_model.safetensors` (or diffusers' sharded form,
  `diffusion_pytorch_model.safetensors.index.json`): required, loaded strictly into `NOVAPolicy`;
* `scheduler/scheduler_config.json`: required, diffusers' `FlowMatchEulerDiscreteScheduler` options, turned into
  the head's `FlowMatchScheduler` (sigmas equal diffusers', shift quirk included);
* `vae/` (diffusers `AutoencoderKL`, config + safetensors): optional, needed by `decode` / `encode_images`;
* `text_encoder/` + `tokenizer/` (Phi through transformers `AutoModel` / `AutoTokenizer`): optional, needed for
  string prompts; without them prompts are raw text-encoder features.

`model_index.json` is not read. No pickle is read: `.bin` weights are refused.

`state_dict()` has upstream's transformer keys unprefixed, plus `vae.*` and `text_encoder.*` when those are loaded,
so the dict reads like upstream's pipeline components; the policy is the `transformer` submodule, so
`named_parameters()` (what optimisers and margrpo checkpoints name) keep the `transformer.` prefix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from margrpo.models.base import ImageModel
from margrpo.models.conditioning import Condition
from margrpo.models.nova.model import (
    IMAGE_DECODERS,
    IMAGE_ENCODERS,
    VIDEO_ENCODERS,
    NOVAConfig,
    NOVAPolicy,
    ViTSpec,
)
from margrpo.models.schedulers import FlowMatchScheduler
from margrpo.models.weights import load_state_strict, preserves_global_rng
from margrpo.utils.atomic import atomic_write, atomic_write_text

__all__ = ["NOVAImageModel", "is_nova_folder", "load", "read_scheduler", "read_transformer_config"]

WEIGHTS = "diffusion_pytorch_model.safetensors"
REQUIRED_KEYS = ("image_dim", "image_size", "image_stride", "text_token_dim", "text_token_len", "image_base_size",
                 "video_base_size", "arch")
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# diffusers options that change the sampling sigmas or the step, and the value that leaves them off
SCHEDULER_OFF = {"use_dynamic_shifting": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                 "use_beta_sigmas": False, "invert_sigmas": False, "shift_terminal": None,
                 "stochastic_sampling": False}
MARGRPO_KEY = "_margrpo"  # margrpo's own entries in transformer/config.json (diffusers ignores `_` keys)


def is_nova_folder(path: str | Path) -> bool:
    """A diffusers-style folder with `transformer/config.json` (what `margrpo.models.loading` dispatches on)."""
    return (Path(path) / "transformer" / "config.json").is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(out).__name__}")
    return out


def _arch(name: object, registry: dict, specs: dict, kind: str, cfg_file: Path, heads: bool) -> ViTSpec:
    if not isinstance(name, str):
        raise ValueError(f"{cfg_file}: arch entry for the {kind} must be a name, got {name!r}")
    spec = registry.get(name) or specs.get(name)
    if spec is None:
        raise ValueError(f"{cfg_file}: unknown {kind} arch {name!r}; upstream's are {sorted(registry)}, others "
                         f"go in config.json['_arch_specs'][{name!r}] = {{'depth', 'embed_dim'"
                         f"{', ' + repr('num_heads') if heads else ''}}}")
    try:
        return ViTSpec(int(spec["depth"]), int(spec["embed_dim"]), int(spec["num_heads"]) if heads else 0)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: _arch_specs[{name!r}] = {spec!r} lacks a valid {e}") from None


def read_transformer_config(folder: str | Path) -> tuple[NOVAConfig, dict]:
    """The architecture from `transformer/config.json` and the raw dict (written back unchanged on save)."""
    cfg_file = Path(folder) / "transformer" / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: not a NOVA folder: no transformer/config.json (a NOVA folder is "
                                "diffusers-style: transformer/, scheduler/, optionally vae/, text_encoder/, "
                                "tokenizer/)")
    raw = _read_json(cfg_file)
    cls = raw.get("_class_name", "NOVATransformer3DModel")
    if cls != "NOVATransformer3DModel":
        raise ValueError(f"{cfg_file}: _class_name {cls!r} is not 'NOVATransformer3DModel'; not a NOVA transformer")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{cfg_file}: not a NOVA transformer config: missing keys {missing}")
    if raw.get("rotary_pos_embed"):
        raise ValueError(f"{cfg_file}: rotary_pos_embed=true is not supported by margrpo's NOVA adapter (the "
                         "released text-to-image models use the absolute sin-cos embedding)")
    if raw.get("video_mixer_rank") is not None:
        raise ValueError(f"{cfg_file}: video_mixer_rank is a video option; margrpo's NOVA adapter is text-to-image")
    if not raw["text_token_dim"]:
        raise ValueError(f"{cfg_file}: text_token_dim is empty: a class-conditional NOVA (label_embed) is not "
                         "supported")
    arch = raw["arch"]
    if not isinstance(arch, (list, tuple)) or len(arch) != 3:
        raise ValueError(f"{cfg_file}: arch must be [video encoder, image encoder, head], got {arch!r}")
    specs = raw.get("_arch_specs") or {}
    size = raw["image_size"]
    size = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    try:
        config = NOVAConfig(
            image_dim=int(raw["image_dim"]), image_size=size, image_stride=int(raw["image_stride"]),
            text_token_dim=int(raw["text_token_dim"]), text_token_len=int(raw["text_token_len"]),
            image_base_size=tuple(int(v) for v in raw["image_base_size"]),
            video_base_size=tuple(int(v) for v in raw["video_base_size"]),
            video_encoder=_arch(arch[0], VIDEO_ENCODERS, specs, "video encoder", cfg_file, True),
            image_encoder=_arch(arch[1], IMAGE_ENCODERS, specs, "image encoder", cfg_file, True),
            image_decoder=_arch(arch[2], IMAGE_DECODERS, specs, "image decoder (head)", cfg_file, False))
    except (TypeError, ValueError) as e:
        if str(e).startswith(str(cfg_file)):
            raise
        raise ValueError(f"{cfg_file}: invalid NOVA config ({e})") from None
    if len(config.image_size) != 2 or len(config.image_base_size) != 2 or len(config.video_base_size) != 3:
        raise ValueError(f"{cfg_file}: image_size and image_base_size need 2 values, video_base_size 3")
    config.validate(str(cfg_file))
    return config, raw


def read_scheduler(folder: str | Path, flow_shift: float | None = None, num_sampling_steps: int = 25,
                   noise_level: float = 0.7) -> tuple[FlowMatchScheduler, dict]:
    """`scheduler/scheduler_config.json` -> the head's scheduler, with diffusers' semantics: the config `shift`
    fixes sigma_min / sigma_max at construction, `flow_shift` (when truthy, as upstream's `if flow_shift`) is
    `set_shift` and replaces it in the sampling sigmas' second shift."""
    cfg_file = Path(folder) / "scheduler" / "scheduler_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder}: not a NOVA folder: no scheduler/scheduler_config.json")
    raw = _read_json(cfg_file)
    cls = raw.get("_class_name", SCHEDULER_CLASS)
    if cls != SCHEDULER_CLASS:
        raise ValueError(f"{cfg_file}: scheduler {cls!r} is not {SCHEDULER_CLASS!r}; margrpo's NOVA head is the flow "
                         "matching one")
    on = {k: raw[k] for k, off in SCHEDULER_OFF.items() if raw.get(k, off) not in (off, None, False)}
    if on:
        raise ValueError(f"{cfg_file}: options {on} are not supported (they change diffusers' sampling sigmas or "
                         "step); margrpo implements the plain shifted schedule")
    scheduler = FlowMatchScheduler(num_sampling_steps, float(raw.get("shift", 1.0)), noise_level,
                                   sampling_shift=float(flow_shift) if flow_shift else None,
                                   num_train_timesteps=int(raw.get("num_train_timesteps", 1000)))
    return scheduler, raw


def _read_safetensors(directory: Path, name: str = WEIGHTS) -> tuple[dict[str, torch.Tensor], str]:
    """One safetensors file, or diffusers' shards listed by `<name>.index.json`; returns (tensors, source)."""
    single, index = directory / name, directory / f"{name}.index.json"
    if single.is_file():
        files, source = [single], str(single)
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'")
        files, source = [directory / f for f in sorted(set(weight_map.values()))], str(index)
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
        hint = (f"; found {pickles}, which margrpo does not unpickle (convert them to safetensors)" if pickles
                else "")
        raise FileNotFoundError(f"{directory}: no {name} (or {name}.index.json){hint}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own types for a truncated or foreign file
            raise ValueError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return out, source


def _load_vae(directory: Path, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover - depends on the optional dependency
        raise ImportError(f"{directory}: the NOVA VAE needs diffusers (pip install diffusers)") from e
    raw = _read_json(directory / "config.json")
    cls = raw.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"{directory / 'config.json'}: VAE class {cls!r} is not supported (only the image "
                         "AutoencoderKL; video VAEs are not)")
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(directory)))
    tensors, source = _read_safetensors(directory)
    load_state_strict(vae, tensors, source)
    return vae.to(dtype).eval().requires_grad_(False), raw


def _load_text_encoder(folder: Path, dtype: torch.dtype, text_token_dim: int) -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer

    te_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{folder}: text_encoder/ without tokenizer/; string prompts need both")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists upstream's lm_head as unexpected: checked below
    try:
        model, info = AutoModel.from_pretrained(str(te_dir), dtype=dtype, local_files_only=True,
                                                output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith("lm_head."))
    mismatched = info.get("mismatched_keys") or []
    if missing or unexpected or mismatched:
        raise ValueError(f"{te_dir}: the weights do not fit {type(model).__name__}: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, mismatched {list(mismatched)[:10]}")
    hidden = int(getattr(model.config, "hidden_size", -1))
    if hidden != text_token_dim:
        raise ValueError(f"{te_dir}: hidden_size {hidden} != the transformer's text_token_dim {text_token_dim}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return model.eval().requires_grad_(False), tokenizer


class NOVAImageModel(ImageModel):
    """`NOVAPolicy` (the policy, `transformer`) + optional diffusers VAE (`vae`) + optional Phi (`text_encoder`,
    with its tokenizer)."""

    def __init__(self, transformer: NOVAPolicy, vae: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, tokenizer: object | None = None,
                 configs: dict[str, dict] | None = None):
        super().__init__()
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text encoder and a tokenizer go together")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # the raw JSON of each component, written back by save_pretrained (so the folder stays upstream's)
        self.configs = dict(configs or {})
        self.register_state_dict_post_hook(_drop_transformer_prefix)
        self.register_load_state_dict_pre_hook(_add_transformer_prefix)

    @property
    def policy(self) -> NOVAPolicy:
        return self.transformer

    def train(self, mode: bool = True) -> NOVAImageModel:
        """The VAE and Phi stay in eval mode (frozen, and Phi's dropout would make prompt features random, drawn
        from the global RNG); only the transformer follows `mode`."""
        super().train(mode)
        for frozen in (self.vae, self.text_encoder):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def config(self) -> NOVAConfig:
        return self.transformer.config

    @property
    def image_size(self) -> int:
        h, w = self.config.image_size
        if h != w:
            raise ValueError(f"image_size is {h}x{w}; margrpo's image side is for square models")
        return h

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: Sequence[str] | Sequence[torch.Tensor] | None) -> Condition | None:
        """Strings (through Phi) or raw text-encoder features ([T_i, text_token_dim] tensors, T_i <=
        text_token_len) -> Condition(text [B, text_token_len, text_token_dim], text_mask all true): the features at
        t < T_i, `text_embed.weight[t]` after (upstream's `TextEmbed.encode_prompts`)."""
        if prompts is None:
            return None
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts: no prompts (give strings, or raw text-encoder feature tensors)")
        cfg = self.config
        weight = self.transformer.text_embed.weight
        if all(isinstance(p, str) for p in prompts):
            feats = self._phi_features(prompts)
        elif all(isinstance(p, torch.Tensor) for p in prompts):
            feats = prompts
            bad = [tuple(p.shape) for p in feats
                   if p.dim() != 2 or p.shape[1] != cfg.text_token_dim or p.shape[0] > cfg.text_token_len]
            if bad:
                raise ValueError(f"raw prompt features must be [T <= {cfg.text_token_len}, {cfg.text_token_dim}]; "
                                 f"got {bad[:3]}")
        else:
            raise TypeError("prompts are strings or raw text-encoder feature tensors, not a mix of "
                            f"{sorted({type(p).__name__ for p in prompts})}")
        text = weight[: cfg.text_token_len].unsqueeze(0).repeat(len(prompts), 1, 1)
        for i, f in enumerate(feats):
            text[i, : f.shape[0]] = f.to(weight.device, weight.dtype)
        return Condition(text=text, text_mask=torch.ones(text.shape[:2], dtype=torch.bool, device=text.device))

    @torch.no_grad()
    def _phi_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """Phi's last hidden state over each prompt's tokens, truncated at text_token_len.

        Upstream pads every prompt to text_token_len and runs the encoder causally; the prompts here are padded to
        the longest one only. Phi's attention is causal, so the padding after a prompt never reaches its positions.
        """
        if self.text_encoder is None:
            raise ValueError("string prompts need text_encoder/ and tokenizer/ in the NOVA folder; without them give "
                             "raw text-encoder features ([T, text_token_dim] tensors)")
        n = self.config.text_token_len
        ids = [list(self.tokenizer(p, max_length=n, truncation=True).input_ids) for p in prompts]
        longest = max(len(t) for t in ids)
        if longest == 0:
            return [torch.zeros(0, self.config.text_token_dim) for _ in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = next(self.text_encoder.parameters()).device
        batch = torch.tensor([t + [pad] * (longest - len(t)) for t in ids], device=dev)
        hidden = self.text_encoder(input_ids=batch).last_hidden_state
        return [hidden[i, : len(t)] for i, t in enumerate(ids)]

    # ------------------------------------------------------------------ codec
    def _vae_or_raise(self) -> nn.Module:
        if self.vae is None:
            raise ValueError("this NOVA model was loaded without vae/; decode and encode_images need it")
        return self.vae

    def _vae_factors(self) -> tuple[float, float]:
        vcfg = self._vae_or_raise().config
        return float(vcfg.scaling_factor), float(getattr(vcfg, "shift_factor", None) or 0.0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> unpatchify -> z / scaling_factor + shift_factor -> VAE decode, clamped to [-1, 1]."""
        vae = self._vae_or_raise()
        scale, shift = self._vae_factors()
        lat = self.unpatchify(tokens).to(vae.dtype) / scale + shift
        return vae.decode(lat).sample.float().clamp(-1, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> a VAE posterior sample (from `generator`) -> (z - shift) * scale -> tokens."""
        vae = self._vae_or_raise()
        scale, shift = self._vae_factors()
        z = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
        return self.patchify(((z - shift) * scale).float())

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> Path:
        """The same diffusers-style folder `load` reads; margrpo's entries (metadata, flow_shift) go under
        `_margrpo` in transformer/config.json, which diffusers ignores."""
        path = Path(path)
        tcfg = dict(self.configs.get("transformer", {}))
        extra = {"flow_shift": self.head.scheduler.sampling_shift}
        if metadata:
            extra["metadata"] = metadata
        tcfg[MARGRPO_KEY] = extra
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
        blob = save(tensors, metadata={"format": "pt"})
        atomic_write(path / "transformer" / WEIGHTS, lambda f: f.write(blob), binary=True)
        atomic_write_text(path / "transformer" / "config.json", json.dumps(tcfg, indent=2))
        atomic_write_text(path / "scheduler" / "scheduler_config.json",
                          json.dumps(self.configs.get("scheduler", {"_class_name": SCHEDULER_CLASS,
                                                                    "shift": self.head.scheduler.shift}), indent=2))
        if self.vae is not None:
            self.vae.save_pretrained(str(path / "vae"), safe_serialization=True)
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(str(path / "text_encoder"))
            self.tokenizer.save_pretrained(str(path / "tokenizer"))
        if "model_index" in self.configs:
            atomic_write_text(path / "model_index.json", json.dumps(self.configs["model_index"], indent=2))
        return path

    @classmethod
    def load_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32, flow_shift: float | None = None) -> NOVAImageModel:
        return load(path, flow_shift=flow_shift, dtype=dtype, device=device)


@preserves_global_rng
def load(folder: str | Path, *, flow_shift: float | None = None, dtype: torch.dtype = torch.float32,
         device: torch.device | str = "cpu") -> NOVAImageModel:
    """A NOVA diffusers-style folder -> `NOVAImageModel` in eval mode, `dtype` on `device`; every weight file strictly.

    `flow_shift` is `NOVAPipeline(flow_shift=...)`: diffusers' `set_shift` on the folder's scheduler (None keeps the
    config's shift, or the one a margrpo save recorded).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (a NOVA model is a diffusers-style folder)")
    config, tcfg = read_transformer_config(folder)
    if flow_shift is None:
        flow_shift = (tcfg.get(MARGRPO_KEY) or {}).get("flow_shift")
    scheduler, scfg = read_scheduler(folder, flow_shift)
    transformer = NOVAPolicy(config, scheduler)
    tensors, source = _read_safetensors(folder / "transformer")
    load_state_strict(transformer, tensors, source)
    configs = {"transformer": tcfg, "scheduler": scfg}
    if (folder / "model_index.json").is_file():
        configs["model_index"] = _read_json(folder / "model_index.json")
    vae = None
    if (folder / "vae" / "config.json").is_file():
        vae, configs["vae"] = _load_vae(folder / "vae", dtype)
    text_encoder = tokenizer = None
    if (folder / "text_encoder").is_dir():
        text_encoder, tokenizer = _load_text_encoder(folder, dtype, config.text_token_dim)
    model = NOVAImageModel(transformer, vae, text_encoder, tokenizer, configs)
    return model.to(device=device, dtype=dtype).eval()


def _drop_transformer_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: `transformer.X` -> `X` (upstream's transformer keys)."""
    head = prefix + "transformer."
    for k in [k for k in state_dict if k.startswith(head)]:
        state_dict[prefix + k[len(head):]] = state_dict.pop(k)


def _add_transformer_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook, the inverse: keys outside `vae.` / `text_encoder.` belong to the transformer."""
    own = (prefix + "vae.", prefix + "text_encoder.", prefix + "transformer.")
    for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(own)]:
        state_dict[prefix + "transformer." + k[len(prefix):]] = state_dict.pop(k)
