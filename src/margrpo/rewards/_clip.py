"""Shared CLIP machinery for the CLIP-family rewards (clip_score, hpsv2, pickscore, aesthetic).

Why this exists:

- **Two on-disk formats, one encoder.** PickScore and OpenAI's CLIP ship as transformers
  directories (``config.json`` + weights); HPS v2 and LAION's CLIPs ship as open_clip state dicts
  (``open_clip_pytorch_model.bin``, ``HPS_v2.1_compressed.pt`` = ``{"state_dict": ...}``). Both end
  up behind :class:`ClipEncoder`, which returns L2-normalised float32 features.
- **open_clip without torchvision.** ``open_clip`` imports ``torchvision`` at import time, and no
  torchvision build on PyPI loads beside a CPU-only torch on Linux x86-64 (PyPI's Linux wheels are
  CUDA builds). The standard ViT CLIP that open_clip builds is architecturally the same network as
  ``transformers.CLIPModel`` (pre-LN ViT with class token, ``ln_pre``/``ln_post``, causal text
  transformer pooled at the end-of-text token, bias-free projections), so
  :func:`openclip_to_hf` maps an open_clip state dict onto it exactly. ``backend="auto"`` uses the real
  open_clip where it imports and this conversion elsewhere; tests check the two agree.
- **Preprocessing we control.** The image transform is implemented here with PIL/torch so that a
  reward's value does not depend on which image-processor backend a transformers version picks. It
  reproduces torchvision's ``Resize(int, BICUBIC) + CenterCrop`` on PIL (open_clip/OpenAI eval) and
  HPS v2's ``ToTensor + ResizeMaxSize`` (bicubic, antialiased, zero padding to a square).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "ClipPreprocess",
    "ClipEncoder",
    "load_hf_clip",
    "load_openclip_checkpoint",
    "load_state_dict_file",
    "openclip_to_hf",
    "openclip_available",
    "build_clip_encoder",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip vision towers whose attention head width is not the default 64 (from open_clip's
# model_configs/*.json: "head_width"). Text towers always use 64-wide heads.
VISION_HEAD_WIDTH = {"ViT-H-14": 80, "ViT-H-16": 80, "ViT-g-14": 88, "ViT-bigG-14": 104}

_MODES = ("shortest_crop", "longest_pad")


@dataclass(frozen=True)
class ClipPreprocess:
    """Image -> normalised ``[3, S, S]`` float32 tensor, as the reference implementation does it.

    ``mode="shortest_crop"``: torchvision ``Resize(S, BICUBIC)`` on the PIL image (short side to S,
    long side ``int(S * long / short)``) then ``CenterCrop(S)`` (offset ``round((n - S) / 2)``): the
    open_clip / OpenAI / ImageReward / PickScore evaluation transform.
    ``mode="longest_pad"``: HPS v2's ``preprocess_val`` (``light_augmentation=True``): to tensor, bicubic
    antialiased resize of the long side to S (``round`` for the other), zero-pad to S x S centred.
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    mode: str = "shortest_crop"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"preprocess mode must be one of {_MODES}, got {self.mode!r}")

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.one(im) for im in images])

    def one(self, im: Image.Image) -> torch.Tensor:
        s = int(self.image_size)
        im = im.convert("RGB")
        if self.mode == "shortest_crop":
            w, h = im.size
            nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
            im = im.crop((left, top, left + s, top + s))
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        else:
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
            h, w = x.shape[1:]
            scale = s / float(max(h, w))
            if scale != 1.0:
                nh, nw = round(h * scale), round(w * scale)
                x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
                ph, pw = s - nh, s - nw
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


def openclip_available() -> bool:
    """True if ``import open_clip`` works here (it needs a torchvision that loads beside torch)."""
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or torchvision's RuntimeError on a mismatched build
        return False
    return True


def load_state_dict_file(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Unwraps ``{"state_dict": ...}`` (HPS v2, Lightning) and strips a DataParallel ``module.`` prefix.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(p))
    else:
        from margrpo.utils.safe_load import safe_torch_load

        obj = safe_torch_load(p)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what} {p}: expected a state dict of tensors (or {{'state_dict': ...}}), got {type(obj)}")
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    return max(idx) + 1 if idx else 0


def openclip_to_hf(sd: Mapping[str, torch.Tensor], *, vision_head_width: int = 64, text_head_width: int = 64,
                   quick_gelu: bool = False, source: str = "state dict") -> tuple[Any, dict[str, torch.Tensor]]:
    """Map a standard open_clip ViT CLIP state dict onto ``transformers.CLIPModel``.

    Returns ``(CLIPConfig, hf_state_dict)``. Sizes are read from the tensors; the two things the
    tensors cannot tell are passed in: the vision head width (64 except ViT-H/g/bigG, see
    :data:`VISION_HEAD_WIDTH`) and the activation (``quick_gelu=True`` for OpenAI-trained weights).
    Non-standard towers (attentional pooling, custom/HF text towers, layer scale, logit bias...) are
    refused with the unexpected keys listed, rather than silently mis-loaded.
    """
    from transformers import CLIPConfig

    required = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                "visual.ln_post.weight", "visual.proj", "token_embedding.weight", "positional_embedding",
                "ln_final.weight", "text_projection", "logit_scale"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"{source}: not a standard open_clip ViT CLIP state dict; missing keys {missing}")
    v_layers = _count_blocks(sd, "visual.transformer.resblocks.")
    t_layers = _count_blocks(sd, "transformer.resblocks.")
    conv = sd["visual.conv1.weight"]
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    n_pos = int(sd["visual.positional_embedding"].shape[0])
    grid = int(round(math.sqrt(n_pos - 1)))
    if grid * grid != n_pos - 1:
        raise ValueError(f"{source}: visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
    vocab, t_width = (int(x) for x in sd["token_embedding.weight"].shape)
    ctx = int(sd["positional_embedding"].shape[0])
    embed_dim = int(sd["visual.proj"].shape[1])
    if v_width % vision_head_width or t_width % text_head_width:
        raise ValueError(f"{source}: widths {v_width}/{t_width} are not multiples of head widths "
                         f"{vision_head_width}/{text_head_width}")
    act = "quick_gelu" if quick_gelu else "gelu"
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=t_width, num_hidden_layers=t_layers,
                         intermediate_size=int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                         num_attention_heads=t_width // text_head_width, max_position_embeddings=ctx,
                         hidden_act=act, layer_norm_eps=1e-5, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=v_width, num_hidden_layers=v_layers,
                           intermediate_size=int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                           num_attention_heads=v_width // vision_head_width, image_size=grid * patch,
                           patch_size=patch, hidden_act=act, layer_norm_eps=1e-5),
        projection_dim=embed_dim,
    )
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(src: str) -> torch.Tensor:
        used.add(src)
        return sd[src]

    def block(src: str, dst: str) -> None:
        qkv_w, qkv_b = take(f"{src}.attn.in_proj_weight"), take(f"{src}.attn.in_proj_bias")
        for name, w, b in zip(("q", "k", "v"), qkv_w.chunk(3, 0), qkv_b.chunk(3, 0), strict=True):
            out[f"{dst}.self_attn.{name}_proj.weight"] = w.clone()
            out[f"{dst}.self_attn.{name}_proj.bias"] = b.clone()
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for s_name, d_name in pairs.items():
            for p in ("weight", "bias"):
                out[f"{dst}.{d_name}.{p}"] = take(f"{src}.{s_name}.{p}")

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for p in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{p}"] = take(f"visual.ln_pre.{p}")
        out[f"vision_model.post_layernorm.{p}"] = take(f"visual.ln_post.{p}")
        out[f"text_model.final_layer_norm.{p}"] = take(f"ln_final.{p}")
    for i in range(v_layers):
        block(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(t_layers):
        block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    out["visual_projection.weight"] = take("visual.proj").t().contiguous()
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    out["text_projection.weight"] = take("text_projection").t().contiguous()
    out["logit_scale"] = take("logit_scale").reshape(())
    ignorable = {"attn_mask", "visual.attn_mask"}
    extra = sorted(k for k in sd if k not in used and k not in ignorable)
    if extra:
        shown = extra[:8] + (["..."] if len(extra) > 8 else [])
        raise ValueError(f"{source}: open_clip keys this loader does not support (non-standard tower?): {shown}; "
                         "use backend='open_clip' where open_clip imports")
    return cfg, out


class ClipEncoder:
    """A CLIP model + tokenizer + preprocessing that returns L2-normalised float32 features.

    ``kind`` is ``"hf"`` (a ``transformers.CLIPModel``) or ``"open_clip"`` (an ``open_clip`` model).
    Text features are computed once per distinct prompt in a batch: GRPO groups repeat each prompt.
    """

    def __init__(self, model: torch.nn.Module, tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
                 preprocess: ClipPreprocess, *, kind: str, device: torch.device, dtype: torch.dtype,
                 source: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenize = tokenize
        self.preprocess = preprocess
        self.kind = kind
        self.source = source
        self.dtype = dtype
        self.to(device)

    def to(self, device: str | torch.device) -> ClipEncoder:
        self.device = torch.device(device)
        self.model.to(device=self.device, dtype=self.dtype)
        return self

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        px = self.preprocess(images).to(self.device, self.dtype)
        if self.kind == "hf":
            feats = _pooled(self.model.get_image_features(pixel_values=px))
        else:
            feats = self.model.encode_image(px)
        return F.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        uniq = list(dict.fromkeys(texts))
        toks = {k: v.to(self.device) for k, v in self.tokenize(uniq).items()}
        if self.kind == "hf":
            feats = _pooled(self.model.get_text_features(**toks))
        else:
            feats = self.model.encode_text(toks["input_ids"])
        feats = F.normalize(feats.float(), dim=-1)
        index = {t: i for i, t in enumerate(uniq)}
        return feats[torch.tensor([index[t] for t in texts], device=feats.device)]


def _pooled(out: Any) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x wraps them in ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_tokenizer(path: str | os.PathLike, context_length: int, *, what: str) -> Callable[[list[str]], dict]:
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: tokenizer directory not found: {p} (a transformers CLIP tokenizer: "
                                "tokenizer.json or vocab.json + merges.txt)")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)

    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    tokenize.eos_token_id = tok.eos_token_id  # type: ignore[attr-defined]
    return tokenize


def _no_text(what: str) -> Callable[[list[str]], dict]:
    def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
        raise RuntimeError(f"{what}: this encoder was loaded for images only (no tokenizer)")

    return tokenize


def _preprocess_from_dir(path: Path, mode: str | None) -> ClipPreprocess:
    """Read size/mean/std from a transformers ``preprocessor_config.json`` (defaults: OpenAI, 224)."""
    cfg_path = path / "preprocessor_config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    crop = cfg.get("crop_size", 224)
    size = crop.get("height", 224) if isinstance(crop, Mapping) else int(crop)
    mean = tuple(cfg.get("image_mean", OPENAI_MEAN))
    std = tuple(cfg.get("image_std", OPENAI_STD))
    return ClipPreprocess(int(size), mean, std, mode or "shortest_crop")  # type: ignore[arg-type]


def load_hf_clip(model_path: str | os.PathLike, *, processor_path: str | os.PathLike | None = None,
                 device: torch.device, dtype: torch.dtype, preprocess_mode: str | None = None,
                 need_text: bool = True, what: str = "clip") -> ClipEncoder:
    """A transformers CLIP directory (``config.json`` + weights), tokenizer/processor from ``processor_path``."""
    from transformers import CLIPModel

    mp = Path(model_path).expanduser()
    if not (mp / "config.json").is_file():
        raise FileNotFoundError(f"{what}: model_path {mp} is not a transformers model directory (no config.json)")
    pp = Path(processor_path).expanduser() if processor_path is not None else mp
    model = CLIPModel.from_pretrained(str(mp), local_files_only=True)
    ctx = int(model.config.text_config.max_position_embeddings)
    tokenize = _hf_tokenizer(pp, ctx, what=what) if need_text else _no_text(what)
    return ClipEncoder(model, tokenize, _preprocess_from_dir(pp, preprocess_mode), kind="hf", device=device,
                       dtype=dtype, source=str(mp))


def load_openclip_checkpoint(checkpoint: str | os.PathLike, *, arch: str, backend: str = "auto",
                             tokenizer_path: str | os.PathLike | None = None, quick_gelu: bool = False,
                             vision_head_width: int | None = None, image_mean: Sequence[float] = OPENAI_MEAN,
                             image_std: Sequence[float] = OPENAI_STD, preprocess_mode: str = "shortest_crop",
                             need_text: bool = True,
                             device: torch.device, dtype: torch.dtype, what: str = "clip") -> ClipEncoder:
    """An open_clip state dict (``open_clip_pytorch_model.bin``, HPS ``*_compressed.pt``) as a ClipEncoder.

    ``backend``: ``"open_clip"`` builds ``arch`` with open_clip and its own tokenizer; ``"transformers"``
    converts with :func:`openclip_to_hf` and tokenizes with the transformers tokenizer at
    ``tokenizer_path`` (e.g. a local copy of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); ``"auto"`` picks
    open_clip when it imports.
    """
    if backend not in ("auto", "open_clip", "transformers"):
        raise ValueError(f"{what}: backend must be 'auto', 'open_clip' or 'transformers', got {backend!r}")
    sd = load_state_dict_file(checkpoint, what=f"{what} checkpoint")
    use_oc = backend == "open_clip" or (backend == "auto" and openclip_available())
    if use_oc:
        import open_clip

        model = open_clip.create_model(arch, pretrained=None, device="cpu", force_quick_gelu=quick_gelu)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing or [k for k in unexpected if not k.endswith("attn_mask")]:
            raise ValueError(f"{what}: {checkpoint} does not fit open_clip arch {arch!r}: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        oc_tok = open_clip.get_tokenizer(arch)
        size = model.visual.image_size
        size = size[0] if isinstance(size, tuple | list) else size

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            return {"input_ids": oc_tok(texts)}

        pre = ClipPreprocess(int(size), tuple(image_mean), tuple(image_std), preprocess_mode)  # type: ignore[arg-type]
        return ClipEncoder(model, tokenize, pre, kind="open_clip", device=device, dtype=dtype,
                           source=f"{checkpoint} (open_clip {arch})")
    from transformers import CLIPModel

    if tokenizer_path is None and need_text:
        raise ValueError(f"{what}: open_clip is not importable here, so the checkpoint is run through transformers, "
                         "which needs tokenizer_path: a local directory with the CLIP tokenizer files (e.g. a copy "
                         "of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    vhw = vision_head_width or VISION_HEAD_WIDTH.get(arch, 64)
    cfg, hf_sd = openclip_to_hf(sd, vision_head_width=vhw, quick_gelu=quick_gelu, source=str(checkpoint))
    if tokenizer_path is not None:
        tokenize = _hf_tokenizer(tokenizer_path, cfg.text_config.max_position_embeddings, what=what)
        eos = tokenize.eos_token_id  # type: ignore[attr-defined]
        if eos is None or not 0 <= eos < cfg.text_config.vocab_size:
            raise ValueError(f"{what}: tokenizer at {tokenizer_path} has eos_token_id {eos}, outside the checkpoint's "
                             f"vocabulary of {cfg.text_config.vocab_size}; it is not this model's tokenizer")
        cfg.text_config.eos_token_id = eos
    else:
        tokenize = _no_text(what)
    model = CLIPModel(cfg)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: converted {checkpoint} does not fit CLIPModel: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    pre = ClipPreprocess(int(cfg.vision_config.image_size), tuple(image_mean), tuple(image_std),  # type: ignore[arg-type]
                         preprocess_mode)
    return ClipEncoder(model, tokenize, pre, kind="hf", device=device, dtype=dtype,
                       source=f"{checkpoint} (open_clip {arch} via transformers)")


def build_clip_encoder(*, model_path: str | os.PathLike | None = None,
                       processor_path: str | os.PathLike | None = None,
                       checkpoint: str | os.PathLike | None = None, arch: str = "ViT-H-14", backend: str = "auto",
                       tokenizer_path: str | os.PathLike | None = None, quick_gelu: bool = False,
                       vision_head_width: int | None = None, preprocess_mode: str | None = None,
                       need_text: bool = True, device: torch.device, dtype: torch.dtype, what: str) -> ClipEncoder:
    """Either a transformers CLIP directory (``model_path``) or an open_clip state dict (``checkpoint``)."""
    if (model_path is None) == (checkpoint is None):
        raise ValueError(f"{what}: set exactly one of model_path (a transformers CLIP directory) or checkpoint "
                         f"(an open_clip state dict file); got model_path={model_path!r}, checkpoint={checkpoint!r}")
    if model_path is not None:
        return load_hf_clip(model_path, processor_path=processor_path, device=device, dtype=dtype,
                            preprocess_mode=preprocess_mode, need_text=need_text, what=what)
    assert checkpoint is not None
    return load_openclip_checkpoint(checkpoint, arch=arch, backend=backend, tokenizer_path=tokenizer_path,
                                    quick_gelu=quick_gelu, vision_head_width=vision_head_width,
                                    preprocess_mode=preprocess_mode or "shortest_crop", need_text=need_text,
                                    device=device, dtype=dtype, what=what)
