"""``imagereward``: ImageReward v1.0 (THUDM), a BLIP image-grounded text encoder + MLP head.

Why re-implemented here: the ``image-reward`` package imports timm and fairscale (and through them
torchvision) and relies on transformers internals removed in transformers 5
(``apply_chunking_to_forward`` etc. from ``transformers.modeling_utils``). The network itself is
small and fixed, so this module rebuilds it in plain torch with the *same parameter names*, so the
released ``ImageReward.pt`` loads as is:

- ``blip.visual_encoder.*``: BLIP's ViT (timm layout: ``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; LayerNorm
  eps 1e-6, exact GELU). ViT-L/16 at 224 px for v1.0.
- ``blip.text_encoder.*``: BLIP's ``med.py`` BertModel in "multimodal" mode: word + absolute
  position embeddings (no token types), per layer bidirectional self-attention, cross-attention to
  the image tokens (keys/values from ``encoder_width``), feed-forward; post-LN; sizes from
  ``med_config.json``.
- ``mlp.layers.{0,2,4,6,7}``: the same head layout as the LAION aesthetic predictor.

Score (as ``ImageReward.score``): tokenise the prompt (BERT uncased, ``[DEC]``/``[ENC]`` added,
padded to 35), encode the image (CLIP-normalised 224 px, bicubic resize + centre crop), run the text
encoder with cross-attention, take the ``[CLS]`` state, MLP, then ``(r - 0.16717362830052426) /
1.0333394966054072``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ._clip import ClipPreprocess, load_state_dict_file
from .aesthetic import AestheticMLP
from .base import Reward, ScoreResult
from .registry import register_reward

__all__ = ["BlipViT", "MedBertEncoder", "ImageRewardModel", "ImageRewardScore", "IMAGEREWARD_MEAN", "IMAGEREWARD_STD"]

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


# ---------------------------------------------------------------------------------------------- ViT
class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _VitAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _VitMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _VitAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _VitMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipViT(nn.Module):
    """BLIP's VisionTransformer (eval path): returns all tokens ``[B, 1 + N, dim]`` after the final norm."""

    def __init__(self, image_size: int = 224, patch_size: int = 16, dim: int = 1024, depth: int = 24,
                 heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(patch_size, dim)
        n = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList(_VitBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------- BERT
class _BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q = self.query(x).view(b, n, h, d).transpose(1, 2)
        k = self.key(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
        v = self.value(ctx).view(b, ctx.shape[1], h, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if bias is not None:
            scores = scores + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class _BertSelfOutput(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float) -> None:
        super().__init__()
        self.self = _BertSelfAttention(hidden, heads, kv_width)
        self.output = _BertSelfOutput(hidden, eps)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, ctx, bias), x)


class _BertIntermediate(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inter)
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _BertOutput(nn.Module):
    def __init__(self, hidden: int, inter: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(inter, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        hid, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.attention = _BertAttention(hid, heads, hid, eps)
        self.crossattention = _BertAttention(hid, heads, encoder_width, eps)
        self.intermediate = _BertIntermediate(hid, cfg["intermediate_size"], cfg["hidden_act"])
        self.output = _BertOutput(hid, cfg["intermediate_size"], eps)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, self_bias)
        x = self.crossattention(x, image, None)  # every image token is attended (mask of ones)
        return self.output(self.intermediate(x), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _BertLayers(nn.Module):
    def __init__(self, cfg: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg, encoder_width) for _ in range(cfg["num_hidden_layers"]))


class MedBertEncoder(nn.Module):
    """BLIP ``med.py`` BertModel (no pooler) in multimodal encoder mode; returns the last hidden states."""

    def __init__(self, cfg: dict[str, Any], encoder_width: int) -> None:
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertLayers(cfg, encoder_width)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        # med.py: (1 - mask) * -10000 added to the scores (bidirectional, padding keys masked)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.encoder.layer:
            x = layer(x, bias, image)
        return x


class _Blip(nn.Module):
    def __init__(self, vit: BlipViT, text: MedBertEncoder) -> None:
        super().__init__()
        self.visual_encoder = vit
        self.text_encoder = text


class ImageRewardModel(nn.Module):
    """ImageReward's network with the release's parameter names (``blip.*``, ``mlp.layers.*``)."""

    def __init__(self, med_config: dict[str, Any], *, image_size: int = 224, patch_size: int = 16,
                 vision_width: int = 1024, vision_depth: int = 24, vision_heads: int = 16) -> None:
        super().__init__()
        vit = BlipViT(image_size, patch_size, vision_width, vision_depth, vision_heads)
        self.blip = _Blip(vit, MedBertEncoder(med_config, vision_width))
        self.mlp = AestheticMLP(med_config["hidden_size"])

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder(pixels)
        txt = self.blip.text_encoder(ids, attention_mask, image)[:, 0, :].float()
        r = self.mlp(txt.to(self.mlp.layers[0].weight.dtype)).float()
        return ((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).reshape(-1)


_MED_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512}
_MED_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def read_med_config(path: str | os.PathLike) -> dict[str, Any]:
    """``med_config.json`` (BLIP's BERT config); checks the keys this implementation uses."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"imagereward: med_config file not found: {p}")
    cfg = {**_MED_DEFAULTS, **json.loads(p.read_text())}
    missing = [k for k in _MED_REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"imagereward: {p} lacks keys {missing}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"imagereward: {p}: position_embedding_type {cfg['position_embedding_type']!r} unsupported "
                         "(only 'absolute', as in ImageReward v1.0)")
    if cfg["hidden_act"] not in _ACTS:
        raise ValueError(f"imagereward: {p}: hidden_act {cfg['hidden_act']!r} not in {sorted(_ACTS)}")
    return cfg


def load_imagereward_model(checkpoint: str | os.PathLike, med_config: str | os.PathLike,
                           vision_heads: int | None = None) -> ImageRewardModel:
    """Build the network with sizes read from the checkpoint and ``med_config.json``, then load it strictly."""
    cfg = read_med_config(med_config)
    sd = load_state_dict_file(checkpoint, what="imagereward checkpoint")
    try:
        pe = sd["blip.visual_encoder.patch_embed.proj.weight"]
        pos = sd["blip.visual_encoder.pos_embed"]
    except KeyError as e:
        raise ValueError(f"imagereward: {checkpoint} is not an ImageReward checkpoint (missing {e})") from e
    width, patch = int(pe.shape[0]), int(pe.shape[-1])
    grid = int(round(math.sqrt(pos.shape[1] - 1)))
    depth = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
    model = ImageRewardModel(cfg, image_size=grid * patch, patch_size=patch, vision_width=width, vision_depth=depth,
                             vision_heads=vision_heads or max(width // 64, 1))
    wanted = model.state_dict()
    # The release also carries BLIP's contrastive projections and the position_ids buffer; unused here.
    extra_ok = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
    unexpected = [k for k in sd if k not in wanted and not k.startswith(extra_ok)]
    missing = [k for k in wanted if k not in sd]
    if missing or unexpected:
        raise ValueError(f"imagereward: {checkpoint} does not match the ImageReward layout with {med_config}: "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    model.load_state_dict({k: sd[k] for k in wanted})
    return model.eval().requires_grad_(False)


def load_blip_tokenizer(path: str | os.PathLike) -> Any:
    """BERT uncased tokenizer plus BLIP's added ``[DEC]`` (bos) and ``[ENC]`` tokens, from a local directory."""
    from transformers import BertTokenizer

    p = Path(path).expanduser()
    if not ((p / "vocab.txt").is_file() or (p / "tokenizer.json").is_file()):
        raise FileNotFoundError(f"imagereward: tokenizer_path {p} has neither vocab.txt nor tokenizer.json (it "
                                "should be a local copy of bert-base-uncased's tokenizer files)")
    tok = BertTokenizer.from_pretrained(str(p), local_files_only=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@register_reward("imagereward")
class ImageRewardScore(Reward):
    """ImageReward v1.0.

    Args:
        checkpoint: ``ImageReward.pt`` (HF repo ``THUDM/ImageReward``).
        med_config: ``med_config.json`` from the same repo.
        tokenizer_path: local copy of ``bert-base-uncased`` tokenizer files (``vocab.txt``...).
        max_length: prompt length in tokens (35 in ImageReward).
    """

    def __init__(self, *, checkpoint: str | os.PathLike, med_config: str | os.PathLike,
                 tokenizer_path: str | os.PathLike, max_length: int = 35, vision_heads: int | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("batch_size", 16)
        super().__init__(**kwargs)
        self.checkpoint = str(checkpoint)
        self.model = load_imagereward_model(checkpoint, med_config, vision_heads).to(self.device, self.dtype)
        self.model.mlp.float()
        vocab = self.model.blip.text_encoder.embeddings.word_embeddings.num_embeddings
        self.tokenizer = load_blip_tokenizer(tokenizer_path)
        if len(self.tokenizer) > vocab:
            raise ValueError(f"imagereward: tokenizer at {tokenizer_path} has {len(self.tokenizer)} tokens but the "
                             f"checkpoint's vocabulary is {vocab}")
        self.max_length = int(max_length)
        self.preprocess = ClipPreprocess(self.model.blip.visual_encoder.image_size)

    def _move(self) -> None:
        self.model.to(self.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "model": self.checkpoint}

    def score_batch(self, images: list[Image.Image], prompts: list[str],
                    metadata: list[dict[str, Any]]) -> ScoreResult:
        enc = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        pixels = self.preprocess(images).to(self.device, self.dtype)
        return self.model(pixels, enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
