"""NOVA's transformer (BAAI, baaivision/NOVA `NOVATransformer3DModel`) as a margrpo `Policy`, text-to-image only.

Module and parameter names are upstream's, so `NOVAPolicy.state_dict()` has exactly the keys of upstream's
`transformer/diffusion_pytorch_model.safetensors`:

* `text_embed` (`proj`, `norm`, buffer `weight` [512, text_token_dim]): `c_text = LayerNorm(Linear(text))`, and the
  learned text features that fill prompt positions past the prompt's end (and every position of the empty prompt);
* `video_encoder` (a ViT over `[c_text; frame]`): at image generation the frame is the BOS frame, every token
  `mask_embed.bos_token` + the time embedding of t = 0 (`video_pos_embed.time_proj` / `.norm`) + 2-D sin-cos;
  its frame outputs condition the image encoder;
* `image_encoder` (a ViT over `[frame outputs; canvas]`): the canvas goes through `patch_embed` (a p x p conv), unknown
  tokens become `mask_embed.mask_token`, plus 2-D sin-cos; the first depth/2 blocks see only the known tokens, the
  rest see all of them; z = `norm` of the canvas part;
* `image_decoder` (`DiffusionMLP`): the per-token flow-matching head, here `NOVAFlowHead`, a `FlowHead` whose
  network is upstream's MLP (AdaLN-Zero blocks, post-norm projectors).

Blocks are upstream's "post-norm residual" ViT blocks, `x + LN(attn(x))`, then `x + LN(mlp(x))`, LayerNorm eps 1e-5
(PyTorch's default, as upstream); the head's AdaLN norms use eps 1e-6 as upstream.

Tokens: patch p = 15 // image_stride + 1; each token holds p*p*image_dim latent values in (p, q, channel) order,
channel fastest (upstream `PatchEmbed.patchify`), raster order over the (H/stride/p) x (W/stride/p) grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from margrpo.models.base import Policy
from margrpo.models.conditioning import Condition
from margrpo.models.flow_head import FlowHead
from margrpo.models.heads import DiffusionHead
from margrpo.models.schedulers import FlowMatchScheduler

# Upstream's registered architecture names (`transformer_nova.py`): depth, width and heads.
VIDEO_ENCODERS = {f"vit_d16w{w}": {"depth": 16, "embed_dim": w, "num_heads": 12 if w == 768 else 16}
                  for w in (768, 1024, 1536)}
IMAGE_ENCODERS = {f"vit_d32w{w}": {"depth": 32, "embed_dim": w, "num_heads": 12 if w == 768 else 16}
                  for w in (768, 1024, 1536)}
IMAGE_DECODERS = {"mlp_d3w1280": {"depth": 3, "embed_dim": 1280},
                  **{f"mlp_d6w{w}": {"depth": 6, "embed_dim": w} for w in (768, 1024, 1536)}}
TEXT_EMBED_POSITIONS = 512  # rows of upstream's `text_embed.weight` buffer ("maximum positions")


@dataclass(frozen=True)
class ViTSpec:
    depth: int
    embed_dim: int
    num_heads: int = 0


@dataclass(frozen=True)
class NOVAConfig:
    """The architecture read from `transformer/config.json` (upstream's `NOVATransformer3DModel` arguments)."""

    image_dim: int
    image_size: tuple[int, int]  # pixels (H, W)
    image_stride: int
    text_token_dim: int
    text_token_len: int
    image_base_size: tuple[int, int]  # the token grid the sin-cos position embedding covers
    video_base_size: tuple[int, int, int]  # (T, h, w) of the frame grid
    video_encoder: ViTSpec
    image_encoder: ViTSpec
    image_decoder: ViTSpec

    @property
    def patch_size(self) -> int:
        return 15 // self.image_stride + 1

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.image_stride, self.image_size[1] // self.image_stride

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // self.patch_size, w // self.patch_size

    @property
    def frame_grid(self) -> tuple[int, int]:
        h, w = self.latent_size
        return h // (2 * self.patch_size), w // (2 * self.patch_size)  # the video encoder's patch is 2p

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:
        return self.patch_size**2 * self.image_dim

    def validate(self, source: str) -> None:
        """Reject what upstream would fail on later (a shape error mid-forward) with one clear message."""
        h, w = self.latent_size
        if self.image_size[0] % self.image_stride or self.image_size[1] % self.image_stride:
            raise ValueError(f"{source}: image_size {list(self.image_size)} is not divisible by image_stride "
                             f"{self.image_stride}")
        if h % (2 * self.patch_size) or w % (2 * self.patch_size):
            raise ValueError(f"{source}: the latent grid {h}x{w} is not divisible by the video patch "
                             f"{2 * self.patch_size}")
        if tuple(self.image_base_size) != self.grid:
            raise ValueError(f"{source}: image_base_size {list(self.image_base_size)} must equal the token grid "
                             f"{list(self.grid)} (image_size / image_stride / patch {self.patch_size}); upstream's "
                             "sin-cos embedding covers exactly image_base_size")
        if tuple(self.video_base_size[1:]) != self.frame_grid:
            raise ValueError(f"{source}: video_base_size {list(self.video_base_size)} must be [1, "
                             f"{self.frame_grid[0]}, {self.frame_grid[1]}] (the frame grid, patch "
                             f"{2 * self.patch_size})")
        if self.video_base_size[0] != 1:
            raise ValueError(f"{source}: video_base_size[0] = {self.video_base_size[0]} is a video model "
                             "(motion embedding); margrpo's NOVA adapter is text-to-image only")
        dims = {self.video_encoder.embed_dim, self.image_encoder.embed_dim}
        if len(dims) != 1:
            raise ValueError(f"{source}: the video encoder ({self.video_encoder.embed_dim}) and image encoder "
                             f"({self.image_encoder.embed_dim}) widths differ; upstream conditions one on the other")
        for name, spec in (("video encoder", self.video_encoder), ("image encoder", self.image_encoder)):
            if spec.num_heads <= 0 or spec.embed_dim % spec.num_heads:
                raise ValueError(f"{source}: the {name} width {spec.embed_dim} is not divisible by its "
                                 f"{spec.num_heads} heads")
        if self.text_token_len > TEXT_EMBED_POSITIONS:
            raise ValueError(f"{source}: text_token_len {self.text_token_len} exceeds upstream's "
                             f"{TEXT_EMBED_POSITIONS} text positions")


# ----------------------------------------------------------------------------------------------------------- layers
def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Upstream `PosEmbed.get_space_embed` at its base size: [h*w, dim] = [sin(x f), cos(x f), sin(y f), cos(y f)]
    with f = 10000^(-k / (dim/4)), x the column and y the row of each raster position (float32)."""
    freq = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="xy")
    fw, fh = (g.reshape(-1, 1) * freq.unsqueeze(0) for g in (grid_w, grid_h))
    return torch.cat([fw.sin(), fw.cos(), fh.sin(), fh.cos()], dim=-1)


def timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[N, dim] = [cos(t f), sin(t f)], f = exp(-ln(10000) k / (dim/2)) (upstream `TimeCondEmbed`), float32."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
    emb = t.float().unsqueeze(-1) * freq.unsqueeze(0)
    return torch.cat([emb.cos(), emb.sin()], dim=-1)


class PatchEmbed(nn.Module):
    """A p x p stride-p convolution (`patch_embed.proj`), applied to tokens already in the patchify layout."""

    def __init__(self, image_dim: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.image_dim, self.patch_size = image_dim, patch_size
        self.proj = nn.Conv2d(image_dim, embed_dim, patch_size, patch_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., p*p*c] tokens in (p, q, c) order -> [..., embed_dim]: the conv on each patch, as a linear map."""
        p, c = self.patch_size, self.image_dim
        w = self.proj.weight
        x = tokens.to(w.dtype).unflatten(-1, (p, p, c)).movedim(-1, -3).flatten(-3)  # (c, p, q): the conv's order
        return F.linear(x, w.flatten(1), self.proj.bias)


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` [B, N] bool (True = attend) hides padding when rows hold different numbers of tokens."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Upstream's block: the norms follow the sublayers, `x + LN(attn(x))`, `x + LN(mlp(x))`."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.norm1(self.attn(x, key_mask))
        return x + self.norm2(self.mlp(x))


class VisionTransformer(nn.Module):
    """Upstream's `VisionTransformer` parameters (`patch_embed`, `blocks`, `norm`); the forward is NOVA's two uses."""

    def __init__(self, spec: ViTSpec, image_dim: int, patch_size: int):
        super().__init__()
        self.embed_dim = spec.embed_dim
        self.patch_embed = PatchEmbed(image_dim, spec.embed_dim, patch_size)
        self.blocks = nn.ModuleList(Block(spec.embed_dim, spec.num_heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.embed_dim)
        self.encoder_depth = spec.depth // 2

    def run(self, x: torch.Tensor, grad_checkpointing: bool = False, blocks: slice = slice(None),
            key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks[blocks]:
            if grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, key_mask, use_reentrant=False)
            else:
                x = blk(x, key_mask)
        return x


class TextEmbed(nn.Module):
    def __init__(self, token_dim: int, embed_dim: int, num_tokens: int):
        super().__init__()
        self.token_dim, self.num_tokens = token_dim, num_tokens
        self.proj, self.norm = nn.Linear(token_dim, embed_dim), nn.LayerNorm(embed_dim)
        self.register_buffer("weight", torch.zeros(TEXT_EMBED_POSITIONS, token_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(text.to(self.proj.weight.dtype)))


class MaskEmbed(nn.Module):
    def __init__(self, embed_dim: int):
        super().__init__()
        self.bos_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        nn.init.normal_(self.bos_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)


class VideoPosEmbed(nn.Module):
    """Upstream's `VideoPosEmbed` parameters: the frame-time MLP and its norm (the sin-cos parts have none)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.time_proj = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))

    def first_frame_time(self) -> torch.Tensor:
        """[1, dim]: the embedding of frame t = 0 (sin 0 = 0 on the first 128 features, cos 0 = 1 on the rest)."""
        w = self.time_proj[0].weight
        feats = torch.cat([torch.zeros(1, 128), torch.ones(1, 128)], dim=-1).to(w.device, w.dtype)
        return self.norm(self.time_proj(feats))


class AdaLayerNormZero(nn.Module):
    """`proj(SiLU(c))` -> num_stats chunks (scale, shift, [gate]); LN(x) (no affine, eps 1e-6) * (1 + scale) + shift."""

    def __init__(self, dim: int, num_stats: int):
        super().__init__()
        self.proj = nn.Linear(dim, num_stats * dim)
        self.norm = nn.LayerNorm(dim, 1e-6, elementwise_affine=False)
        self.num_stats = num_stats

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        stats = self.proj(F.silu(c)).chunk(self.num_stats, dim=-1)
        return self.norm(x) * (1 + stats[0]) + stats[1], stats[2:]


class Projector(nn.Module):
    def __init__(self, dim: int, mlp_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class TimeCondEmbed(nn.Module):
    def __init__(self, cond_dim: int, embed_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.timestep_proj = Projector(freq_dim, embed_dim, embed_dim)
        self.condition_proj = Projector(cond_dim, embed_dim, embed_dim)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.condition_proj(z) + self.timestep_proj(timestep_features(t, self.freq_dim).to(z.dtype))


class DiffusionBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_stats=3)
        self.proj = Projector(dim, dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h, (gate,) = self.norm1(x, c)
        return x + self.norm2(self.proj(h)) * gate


class NOVAFlowHead(FlowHead):
    """Upstream's `DiffusionMLP` (parameters `patch_embed`, `time_cond_embed`, `blocks`, `norm`, `head`) as a
    margrpo `FlowHead`: the flow scheduler, guidance, SDE step, log-probabilities and loss are FlowHead's.

    `FlowHead.__init__` is bypassed because it builds MAR's MLP-AdaLN network as a `net` submodule, which would put
    the parameters under `net.*`; here they sit on the head itself (upstream's `image_decoder.*` keys) and `net` is
    the method that runs them: `net(x_t [..., N, p*p*c] in the patchify layout, t [N] = sigma * 1000, z [N, D])` -> v
    (leading axes of x_t broadcast over the per-token conditioning, as in MAR's network).
    """

    def __init__(self, spec: ViTSpec, cond_dim: int, patch_size: int, image_dim: int,
                 scheduler: FlowMatchScheduler, grad_checkpointing: bool = False):
        DiffusionHead.__init__(self)
        self.token_dim = patch_size**2 * image_dim
        self.scheduler = scheduler
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(image_dim, spec.embed_dim, patch_size)
        self.time_cond_embed = TimeCondEmbed(cond_dim, spec.embed_dim)
        self.blocks = nn.ModuleList(DiffusionBlock(spec.embed_dim) for _ in range(spec.depth))
        self.norm = AdaLayerNormZero(spec.embed_dim, num_stats=2)
        self.head = nn.Linear(spec.embed_dim, self.token_dim)

    def net(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = self.patch_embed(x)
        c = self.time_cond_embed(t, z.to(h.dtype))
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, c, use_reentrant=False)
            else:
                h = blk(h, c)
        return self.head(self.norm(h, c)[0])


# ----------------------------------------------------------------------------------------------------------- policy
class NOVAPolicy(Policy):
    """NOVA's text-to-image transformer with its flow head: z = f(canvas, mask, text), stateless per call."""

    default_guidance_schedule = "constant"  # upstream's guidance scale is the same at every AR step

    MASK_RATIO_MIN = 0.7  # upstream `MaskEmbed(mask_ratios=(0.7, 1.0))`, truncated normal with scale 0.25
    TEXT_DROP_PROB = 0.1  # upstream `TextEmbed(dropout=0.1)`
    LOSS_REPEAT = 4  # upstream `Transformer3DModel.loss_repeat`

    def __init__(self, config: NOVAConfig, scheduler: FlowMatchScheduler | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        config.validate("NOVAConfig")
        self.config = cfg = config
        self.seq_len = cfg.seq_len
        self.token_embed_dim = cfg.token_dim
        self.grad_checkpointing = grad_checkpointing
        p = cfg.patch_size
        self.video_encoder = VisionTransformer(cfg.video_encoder, cfg.image_dim, 2 * p)
        self.image_encoder = VisionTransformer(cfg.image_encoder, cfg.image_dim, p)
        self.image_decoder = NOVAFlowHead(cfg.image_decoder, cfg.image_encoder.embed_dim, p, cfg.image_dim,
                                          scheduler or FlowMatchScheduler(), grad_checkpointing)
        self.mask_embed = MaskEmbed(cfg.image_encoder.embed_dim)
        self.text_embed = TextEmbed(cfg.text_token_dim, cfg.image_encoder.embed_dim, cfg.text_token_len)
        self.video_pos_embed = VideoPosEmbed(cfg.video_encoder.embed_dim)
        # The sin-cos tables are functions of the config: non-persistent, so they are not state_dict keys.
        self.register_buffer("image_space_embed", sincos_2d(cfg.image_encoder.embed_dim, *cfg.image_base_size),
                             persistent=False)
        self.register_buffer("video_space_embed", sincos_2d(cfg.video_encoder.embed_dim, *cfg.video_base_size[1:]),
                             persistent=False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """The video and image encoders read `grad_checkpointing` at every call (the flow head keeps its own)."""
        self.grad_checkpointing = bool(enabled)

    def lora_target_modules(self) -> str:
        """The video and image encoders' attention and MLP linears; not the flow head (`image_decoder`)."""
        return r"(video_encoder|image_encoder)\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

    @property
    def head(self) -> NOVAFlowHead:
        """The flow head, stored as upstream's `image_decoder`."""
        return self.image_decoder

    # ------------------------------------------------------------------ token layout
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, c, H, W] latents -> [B, L, p*p*c] tokens, (p, q, channel) inside, channel fastest (upstream's)."""
        b, c, hh, ww = latents.shape
        p = self.config.patch_size
        if (c, hh, ww) != (self.config.image_dim, *self.config.latent_size):
            raise ValueError(f"patchify: latents of shape {tuple(latents.shape)}; this NOVA takes [B, "
                             f"{self.config.image_dim}, {self.config.latent_size[0]}, {self.config.latent_size[1]}]")
        x = latents.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (hh // p) * (ww // p), p * p * c)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        p, c = self.config.patch_size, self.config.image_dim
        h, w = self.config.grid
        if tuple(tokens.shape[1:]) != (h * w, p * p * c):
            raise ValueError(f"unpatchify: tokens of shape {tuple(tokens.shape)}; this NOVA's are [B, {h * w}, "
                             f"{p * p * c}]")
        x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h * p, w * p)

    def mask_schedule(self, num_steps: int, seq_len: int | None = None) -> list[int]:
        """Upstream's AR schedule: m_k = round(L cos(pi/2 k/S)) (half to even), k = 0..S; counts m_k - m_{k+1}
        without the zero ones (so L = 1024, S = 64 gives 63 steps)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        n = self.seq_len if seq_len is None else seq_len
        lengths = np.round(np.cos(0.5 * np.pi * np.arange(num_steps + 1) / num_steps) * n).astype(np.int64)
        return [int(c) for c in lengths[:-1] - lengths[1:] if c > 0]

    # ------------------------------------------------------------------ conditioning
    def unconditional_text(self, bsz: int) -> torch.Tensor:
        """[B, text_token_len, text_token_dim]: the empty prompt, `text_embed.weight` at every position."""
        return self.text_embed.weight[: self.config.text_token_len].unsqueeze(0).expand(bsz, -1, -1)

    def _text(self, cond: Condition | None, bsz: int, drop: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            return self.unconditional_text(bsz)
        if not isinstance(cond, Condition) or cond.text is None:
            raise TypeError("NOVA is text-conditional: give a Condition with `text` (from encode_prompts) or None")
        if len(cond) != bsz:
            raise ValueError(f"condition batch {len(cond)} does not match token batch {bsz}")
        cfg = self.config
        if tuple(cond.text.shape[1:]) != (cfg.text_token_len, cfg.text_token_dim):
            raise ValueError(f"text features {tuple(cond.text.shape[1:])} are not [text_token_len, text_token_dim] "
                             f"= [{cfg.text_token_len}, {cfg.text_token_dim}]; build the condition with "
                             "encode_prompts")
        text = cond.text.to(self.text_embed.weight.dtype)
        if drop is not None:
            text = torch.where(drop.to(text.device)[:, None, None], self.unconditional_text(bsz), text)
        return text

    def frame_condition(self, text: torch.Tensor) -> torch.Tensor:
        """The video encoder on [LN(Linear(text)); BOS frame] -> the frame outputs [B, frame tokens, D].

        The frame is the BOS frame at every AR step, in sampling and in training (upstream's training-time
        re-forward in MAR-GRPO appended the canvas as a second frame, a different function from the one that
        sampled; here there is one function).
        """
        c_text = self.text_embed(text)
        b, t = c_text.shape[:2]
        frame = (self.mask_embed.bos_token + self.video_pos_embed.first_frame_time()
                 + self.video_space_embed.to(c_text.dtype))
        x = torch.cat([c_text, frame.unsqueeze(0).expand(b, -1, -1)], dim=1)
        x = self.video_encoder.run(x, self.grad_checkpointing)
        return self.video_encoder.norm(x)[:, t:]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cond: Condition | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, L, D] for a canvas `tokens` [B, L, C] and `mask` [B, L] (1 = unknown); `drop[b]` or `cond=None`
        gives the empty prompt. Rows may hold different numbers of known tokens (several AR steps in one batch):
        their known tokens are gathered to the front and padded, the padding hidden from every attention."""
        bsz, seq_len, _ = tokens.shape
        enc = self.image_encoder
        c = self.frame_condition(self._text(cond, bsz, drop))
        n_c = c.shape[1]
        unknown = mask.bool()
        x = enc.patch_embed(tokens)
        x = torch.where(unknown[..., None], self.mask_embed.mask_token.to(x.dtype), x) + self.image_space_embed.to(
            x.dtype)
        if enc.encoder_depth:
            known = ~unknown
            counts = known.sum(1)
            d = x.shape[-1]
            if bool((counts == counts[0]).all()):
                xk, valid, key_mask = x[known].reshape(bsz, -1, d), None, None
            else:
                n = int(counts.max())
                order = torch.argsort(unknown.to(torch.int8), dim=1, stable=True)[:, :n]  # known first, raster order
                xk = torch.gather(x, 1, order[..., None].expand(-1, -1, d))
                valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]
                key_mask = torch.cat([torch.ones(bsz, n_c, dtype=torch.bool, device=x.device), valid], dim=1)
            h = enc.run(torch.cat([c, xk], dim=1), self.grad_checkpointing, slice(None, enc.encoder_depth), key_mask)
            c, hk = h[:, :n_c], h[:, n_c:]
            # under autocast the blocks end in float32 (LayerNorm) while the patch embedding is bf16: scatter into
            # the wider dtype (a no-op without autocast)
            x = x.to(hk.dtype).masked_scatter(known[..., None], hk.reshape(-1, d) if valid is None else hk[valid])
        h = enc.run(torch.cat([c, x], dim=1), self.grad_checkpointing, slice(enc.encoder_depth, None))
        return enc.norm(h[:, n_c:])

    # ------------------------------------------------------------------ pretraining
    def pretrain_loss(self, tokens: torch.Tensor, cond: Condition | None, generator: torch.Generator | None = None,
                      drop_conditions: bool | None = None) -> torch.Tensor:
        """Upstream's image objective: a random order, round((1 - r) L) known tokens with r ~ N(1, 0.25) truncated
        to [0.7, 1], the text dropped with probability 0.1 (the empty prompt), the flow loss on the unknown tokens,
        each repeated 4 times. The noise level is FlowHead's continuous logit-normal sigma (upstream draws the
        integer timestep floor(1000 sigmoid(N(0, 1))) and indexes the config-shifted training sigmas)."""
        from margrpo.models.mar.model import _truncnorm_sample  # MAR's mask-ratio law, the same distribution

        if drop_conditions is None:
            drop_conditions = self.training
        bsz, seq_len, _ = tokens.shape
        dev = tokens.device
        orders = self.sample_orders(bsz, generator, dev)
        rate = float(_truncnorm_sample(1, self.MASK_RATIO_MIN, 1.0, 1.0, 0.25, generator)[0])
        n_known = int(np.round((1 - rate) * seq_len))
        mask = torch.ones(bsz, seq_len, device=dev)
        mask.scatter_(1, orders[:, :n_known], 0.0)
        drop = None
        if drop_conditions and cond is not None:
            drop = torch.rand(bsz, generator=generator, device=dev) < self.TEXT_DROP_PROB
        z = self(tokens, mask, cond, drop)
        rep = self.LOSS_REPEAT
        target = tokens.reshape(bsz * seq_len, -1).repeat(rep, 1)
        loss = self.head.loss(target, z.reshape(bsz * seq_len, -1).repeat(rep, 1), generator=generator)
        m = mask.reshape(-1).repeat(rep)
        return (loss * m).sum() / m.sum().clamp(min=1)
