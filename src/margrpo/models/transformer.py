"""Pre-norm ViT blocks with timm's parameter names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1/fc2`).

MAR builds its encoder and decoder from `timm.models.vision_transformer.Block` with qkv bias, exact
GELU and LayerNorm(eps=1e-6); these blocks reproduce that math without depending on timm. An optional
cross-attention (`cross_attn`, `norm_cross`) lets text tokens condition the image tokens when the
model is configured with `condition_mode="cross_attention"`; it is absent (no parameters) otherwise,
so LTH14 checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention; `key_mask` [B, n] bool (True = a real token) keeps padding out of every softmax."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Image tokens attend to condition tokens; padded condition tokens are masked out."""

    def __init__(self, dim: int, num_heads: int, cond_dim: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, dim * 2)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        m = cond.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(cond).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        attn_mask = None if cond_mask is None else cond_mask.bool()[:, None, None, :]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, norm_eps: float = 1e-6,
                 cross_attn_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        if cross_attn_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_attn = CrossAttention(dim, num_heads, cross_attn_dim, attn_drop, proj_drop)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        if self.cross_attn is not None:
            if cond is None:
                raise ValueError("this block cross-attends to condition tokens but none were given")
            x = x + self.cross_attn(self.norm_cross(x), cond, cond_mask)
        return x + self.mlp(self.norm2(x))
