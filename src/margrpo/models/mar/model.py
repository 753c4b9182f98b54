"""The masked autoregressive transformer (MAR, Li et al. 2024) with a per-token diffusion head.

Parameter names, tensor layouts and forward math follow LTH14/mar `models/mar.py` so that its released
checkpoints load without renaming: `class_emb`, `fake_latent`, `z_proj`, `z_proj_ln`,
`encoder_pos_embed_learned`, `encoder_blocks.*`, `encoder_norm`, `decoder_embed`, `mask_token`,
`decoder_pos_embed_learned`, `decoder_blocks.*`, `decoder_norm`, `diffusion_pos_embed_learned`,
`diffloss.net.*`. Conventions: raster token order; patchify layout (channel, patch row, patch
column); mask = 1 for masked; the encoder sees only the known tokens plus `buffer_size` condition
tokens; the decoder fills masked positions with `mask_token`.

Extensions for text-to-image: `condition="text"` projects text-token embeddings into the buffer
tokens (`condition_mode="buffer"`) or adds cross-attention to them in every block
(`condition_mode="cross_attention"`). A flow-matching head can replace the DDPM head.

MAR is the family's `Policy` (`models/base.py`): calling it, `mar(tokens, mask, cond)` (also
`mar.compute_z(...)`), returns z [B, L, D] for the head (unlike upstream's `MAR.forward`, which returns the
training loss: that is `pretrain_loss` here); `head` is the diffusion head;
`patchify`/`unpatchify` convert between latent images and tokens; `pretrain_loss` is MAR's training objective.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from margrpo.models.base import Policy
from margrpo.models.conditioning import Condition
from margrpo.models.ddpm_head import DdpmHead
from margrpo.models.flow_head import FlowHead
from margrpo.models.heads import DiffusionHead
from margrpo.models.transformer import Block


@dataclass
class MARConfig:
    """Architecture of a MAR model; field names are LTH14/mar's constructor arguments where they exist."""

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    vae_embed_dim: int = 16
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mask_ratio_min: float = 0.7
    label_drop_prob: float = 0.1
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: str = "100"
    diffusion_batch_mul: int = 4
    grad_checkpointing: bool = False
    # --- margrpo extensions (defaults reproduce LTH14/mar) ---
    condition: str = "class"  # "class" | "text"
    condition_mode: str = "buffer"  # "buffer" | "cross_attention" (text only)
    text_dim: int = 0
    head: str = "ddpm"  # "ddpm" | "flow"
    clip_denoised: bool = False  # DDPM: clamp predicted x0 to [-clip_range, clip_range]
    clip_range: float = 1.0  # the data range: 1 for pixel tokens, a bound on |latent| for autoencoder tokens
    noise_schedule: str = "cosine"
    flow_noise_level: float = 0.7
    flow_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.condition not in ("class", "text"):
            raise ValueError(f"condition={self.condition!r}; valid: 'class', 'text'")
        if self.condition_mode not in ("buffer", "cross_attention"):
            raise ValueError(f"condition_mode={self.condition_mode!r}; valid: 'buffer', 'cross_attention'")
        if self.condition == "text" and self.text_dim <= 0:
            raise ValueError("condition='text' needs text_dim > 0 (the text encoder's embedding size)")
        if self.condition_mode == "cross_attention" and self.condition != "text":
            raise ValueError("condition_mode='cross_attention' is only for condition='text'")
        if self.head not in ("ddpm", "flow"):
            raise ValueError(f"head={self.head!r}; valid: 'ddpm', 'flow'")
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by vae_stride*patch_size "
                             f"{self.vae_stride * self.patch_size}")

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h**2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size**2

    def to_dict(self) -> dict:
        return asdict(self)


def _truncnorm_sample(n: int, lo: float, hi: float, loc: float, scale: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Inverse-CDF sample of N(loc, scale^2) truncated to [lo, hi] (MAR's mask-ratio law)."""
    a = torch.tensor((lo - loc) / scale, dtype=torch.float64)
    b = torch.tensor((hi - loc) / scale, dtype=torch.float64)
    cdf = torch.special.ndtr
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    x = torch.special.ndtri(cdf(a) + u * (cdf(b) - cdf(a)))
    return (loc + scale * x).clamp(lo, hi)


LORA_TARGETS = r"(encoder|decoder)_blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q|kv|proj)|mlp\.(fc1|fc2))"


class MARPolicy(Policy):
    def __init__(self, config: MARConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = MARConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a MARConfig or keyword arguments, not both")
        self.config = cfg = config
        self.seq_len = cfg.seq_len
        self.token_embed_dim = cfg.token_dim
        self.buffer_size = cfg.buffer_size
        d_enc, d_dec = cfg.encoder_embed_dim, cfg.decoder_embed_dim
        cross_dim = d_enc if cfg.condition_mode == "cross_attention" else None

        if cfg.condition == "class":
            self.class_emb = nn.Embedding(cfg.class_num, d_enc)
        else:
            self.text_proj = nn.Linear(cfg.text_dim, d_enc)
            if cross_dim is not None:
                self.null_text = nn.Parameter(torch.zeros(1, 1, d_enc))
        self.fake_latent = nn.Parameter(torch.zeros(1, d_enc))

        self.z_proj = nn.Linear(cfg.token_dim, d_enc, bias=True)
        self.z_proj_ln = nn.LayerNorm(d_enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len + cfg.buffer_size, d_enc))
        self.encoder_blocks = nn.ModuleList([
            Block(d_enc, cfg.encoder_num_heads, cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.proj_dropout,
                  attn_drop=cfg.attn_dropout, cross_attn_dim=cross_dim)
            for _ in range(cfg.encoder_depth)
        ])
        self.encoder_norm = nn.LayerNorm(d_enc, eps=1e-6)

        self.decoder_embed = nn.Linear(d_enc, d_dec, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len + cfg.buffer_size, d_dec))
        self.decoder_blocks = nn.ModuleList([
            Block(d_dec, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True, proj_drop=cfg.proj_dropout,
                  attn_drop=cfg.attn_dropout, cross_attn_dim=cross_dim)
            for _ in range(cfg.decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(d_dec, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, d_dec))
        self._init_weights()

        if cfg.head == "ddpm":
            self.diffloss: DiffusionHead = DdpmHead(
                cfg.token_dim, d_dec, cfg.diffloss_w, cfg.diffloss_d, cfg.num_sampling_steps,
                cfg.noise_schedule, cfg.clip_denoised, cfg.grad_checkpointing, clip_range=cfg.clip_range)
        else:
            self.diffloss = FlowHead(cfg.token_dim, d_dec, cfg.diffloss_w, cfg.diffloss_d,
                                     int(cfg.num_sampling_steps), cfg.flow_noise_level, cfg.flow_shift,
                                     cfg.grad_checkpointing)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """The encoder and decoder blocks read upstream's `config.grad_checkpointing` at every call (the head's
        own flag is fixed at construction and is left alone: RL freezes it by default)."""
        self.config.grad_checkpointing = bool(enabled)

    def lora_target_modules(self) -> str:
        """The encoder's and decoder's attention (self and cross) and MLP linears; not the head (`diffloss`)."""
        return LORA_TARGETS

    @property
    def head(self) -> DiffusionHead:
        """The per-token diffusion head (stored as `diffloss` to keep LTH14's parameter names)."""
        return self.diffloss

    def _init_weights(self) -> None:
        for p in (self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        if hasattr(self, "class_emb"):
            nn.init.normal_(self.class_emb.weight, std=0.02)
        if hasattr(self, "null_text"):
            nn.init.normal_(self.null_text, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

    # ------------------------------------------------------------------ token layout
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] latent image -> [B, L, C*p*p] tokens (raster order; channel, row, col inside)."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwcpq", x)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p = self.config.patch_size
        c = self.config.vae_embed_dim
        h = w = self.config.seq_h
        x = x.reshape(b, h, w, c, p, p)
        x = torch.einsum("nhwcpq->nchpwq", x)
        return x.reshape(b, c, h * p, w * p)

    # ------------------------------------------------------------------ conditioning
    def _condition_embeddings(self, cond: Condition | torch.Tensor | None, bsz: int,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Buffer-token values [B, buffer, D] and (cross-attention mode) condition tokens + mask."""
        cfg = self.config
        d = cfg.encoder_embed_dim
        fake = self.fake_latent.to(dtype)
        if isinstance(cond, torch.Tensor):
            cond = Condition(labels=cond)
        if cond is None:
            buffer = fake.unsqueeze(1).expand(bsz, cfg.buffer_size, d)
            if cfg.condition_mode == "cross_attention":
                null = self.null_text.to(dtype).expand(bsz, 1, d)
                return buffer, null, torch.ones(bsz, 1, dtype=torch.bool, device=null.device)
            return buffer, None, None
        if len(cond) != bsz:
            raise ValueError(f"condition batch {len(cond)} does not match token batch {bsz}")
        if cond.labels is not None:
            if cfg.condition != "class":
                raise ValueError("this model is text-conditional; got class labels")
            return self.class_emb(cond.labels).to(dtype).unsqueeze(1).expand(bsz, cfg.buffer_size, d), None, None
        if cfg.condition != "text":
            raise ValueError("this model is class-conditional; got a text condition")
        text = self.text_proj(cond.text.to(self.text_proj.weight.dtype)).to(dtype)
        mask = cond.text_mask.bool()
        if cfg.condition_mode == "cross_attention":
            denom = mask.sum(1, keepdim=True).clamp(min=1)
            pooled = (text * mask.unsqueeze(-1)).sum(1) / denom
            return pooled.unsqueeze(1).expand(bsz, cfg.buffer_size, d), text, mask
        t = text.shape[1]
        if t > cfg.buffer_size:
            raise ValueError(f"text has {t} tokens but buffer_size is {cfg.buffer_size}; "
                             "shorten the text encoder's max_len or enlarge buffer_size")
        buffer = fake.unsqueeze(1).expand(bsz, cfg.buffer_size, d).clone()
        buffer[:, :t] = torch.where(mask.unsqueeze(-1), text, buffer[:, :t])
        return buffer, None, None

    def drop_condition(self, cond: Condition | torch.Tensor | None, generator: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
        """Rows whose condition is replaced by the unconditional one during training (CFG dropout)."""
        n = len(cond) if isinstance(cond, Condition) else cond.shape[0]
        return torch.rand(n, generator=generator, device=device) < self.config.label_drop_prob

    # ------------------------------------------------------------------ position embeddings
    def _grid_pos_embed(self, pe: torch.Tensor, image_shape: tuple[int, int] | None, buffer: int) -> torch.Tensor:
        """`pe` ([1, buffer + seq_h * seq_h, D]) for a token grid of `image_shape` (Harmon's `get_*_pos_embed`).

        The native grid (or None) returns the learned parameter itself, so MAR's arithmetic is untouched; another
        grid interpolates the image rows bilinearly (align_corners=False, as upstream's `F.interpolate`) and keeps
        the buffer rows.
        """
        side = self.config.seq_h
        if image_shape is None or tuple(image_shape) == (side, side):
            return pe
        h, w = image_shape
        buf, img = pe.split([buffer, side * side], dim=1)
        img = img.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        img = img.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([buf, img], dim=1)

    def get_encoder_pos_embed(self, image_shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self._grid_pos_embed(self.encoder_pos_embed_learned, image_shape, self.buffer_size)

    def get_decoder_pos_embed(self, image_shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self._grid_pos_embed(self.decoder_pos_embed_learned, image_shape, self.buffer_size)

    def get_diffusion_pos_embed(self, image_shape: tuple[int, int] | None = None) -> torch.Tensor:
        return self._grid_pos_embed(self.diffusion_pos_embed_learned, image_shape, 0)

    # ------------------------------------------------------------------ encoder / decoder
    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, buffer: torch.Tensor,
                            ctx: torch.Tensor | None = None, ctx_mask: torch.Tensor | None = None,
                            image_shape: tuple[int, int] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode the buffer and the known tokens. Returns (x [B, n, D], valid [B, n] or None).

        Rows with the same number of known tokens drop the masked ones by reshaping, as upstream (valid None).
        Rows with different numbers (several AR steps of a rollout in one batch) gather their known tokens to the
        front, pad to the longest row and mask the padding out of every attention: the same function of each
        row, up to float rounding. `image_shape` (m, n): a token grid other than the native one (Harmon).
        """
        x = self.z_proj(x)
        bsz, _, d = x.shape
        x = torch.cat([buffer.to(x.dtype), x], dim=1)
        mask_with_buffer = torch.cat([torch.zeros(bsz, self.buffer_size, device=x.device), mask.float()], dim=1)
        x = x + self.get_encoder_pos_embed(image_shape)
        x = self.z_proj_ln(x)
        keep = (1 - mask_with_buffer).bool()
        counts = keep.sum(1)
        valid = None
        if bool((counts == counts[0]).all()):
            x = x[keep].reshape(bsz, -1, d)
        else:
            n = int(counts.max())
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]  # known first, in order
            x = torch.gather(x, 1, order[..., None].expand(-1, -1, d))
            valid = torch.arange(n, device=x.device)[None, :] < counts[:, None]
        for blk in self.encoder_blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, ctx, ctx_mask, valid, use_reentrant=False)
            else:
                x = blk(x, ctx, ctx_mask, valid)
        return self.encoder_norm(x), valid

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, ctx: torch.Tensor | None = None,
                            ctx_mask: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                            image_shape: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.decoder_embed(x)
        bsz = x.shape[0]
        mask_with_buffer = torch.cat([torch.zeros(bsz, self.buffer_size, device=x.device), mask.float()], dim=1)
        padded = self.mask_token.to(x.dtype).expand(bsz, mask_with_buffer.shape[1], -1).clone()
        padded[(1 - mask_with_buffer).bool()] = x.reshape(-1, x.shape[2]) if valid is None else x[valid]
        x = padded + self.get_decoder_pos_embed(image_shape)
        for blk in self.decoder_blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, ctx, ctx_mask, use_reentrant=False)
            else:
                x = blk(x, ctx, ctx_mask)
        x = self.decoder_norm(x)
        x = x[:, self.buffer_size:]
        return x + self.get_diffusion_pos_embed(image_shape)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor,
                cond: Condition | torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """The head's per-token input z [B, L, D] for a canvas `tokens` [B, L, C] and `mask` [B, L] (1 = masked).

        `cond` is class labels, a text Condition, or None for the unconditional branch (the learned
        fake latent, as upstream). `drop` [B] bool replaces those rows by the unconditional branch
        (classifier-free-guidance training).
        """
        bsz = tokens.shape[0]
        buffer, ctx, ctx_mask = self._condition_embeddings(cond, bsz, tokens.dtype)
        if drop is not None:
            ubuf, uctx, umask = self._condition_embeddings(None, bsz, tokens.dtype)
            buffer = torch.where(drop[:, None, None], ubuf, buffer)
            if ctx is not None:
                uctx = uctx.expand(bsz, ctx.shape[1], -1) if uctx.shape[1] != ctx.shape[1] else uctx
                umask_full = torch.zeros_like(ctx_mask)
                umask_full[:, 0] = True
                ctx = torch.where(drop[:, None, None], uctx, ctx)
                ctx_mask = torch.where(drop[:, None], umask_full, ctx_mask)
        x, valid = self.forward_mae_encoder(tokens, mask, buffer, ctx, ctx_mask)
        return self.forward_mae_decoder(x, mask, ctx, ctx_mask, valid)

    # ------------------------------------------------------------------ pretraining
    def pretrain_loss(self, tokens: torch.Tensor, cond: Condition | torch.Tensor | None,
                      generator: torch.Generator | None = None, drop_conditions: bool | None = None) -> torch.Tensor:
        """MAR's objective: random order, mask ratio ~ truncated N(1, 0.25) on [min, 1], diffusion loss on masked.

        `drop_conditions` (default: in train mode) drops conditions for classifier-free guidance; RL keeps the
        model in eval mode but its pretraining term (PPO-ptx) still wants the pretraining objective.
        """
        if drop_conditions is None:
            drop_conditions = self.training
        dev = tokens.device
        mask = self.random_masking(self.sample_orders(tokens.shape[0], generator, dev), generator)
        drop = self.drop_condition(cond, generator, dev) if (drop_conditions and cond is not None) else None
        z = self(tokens, mask, cond, drop)
        return self.masked_diffusion_loss(tokens, z, mask, generator)

    def random_masking(self, orders: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Upstream `random_masking`: the first ceil(L * r) positions of each order masked, r ~ truncated
        N(1, 0.25) on [mask_ratio_min, 1] (one r per batch). Shared with Harmon, whose pretraining is MAR's."""
        bsz, seq_len = orders.shape
        rate = float(_truncnorm_sample(1, self.config.mask_ratio_min, 1.0, 1.0, 0.25, generator)[0])
        num_masked = int(math.ceil(seq_len * rate))
        mask = torch.zeros(bsz, seq_len, device=orders.device)
        mask.scatter_(1, orders[:, :num_masked], 1.0)
        return mask

    def masked_diffusion_loss(self, tokens: torch.Tensor, z: torch.Tensor, mask: torch.Tensor,
                              generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                              noise: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream `forward_loss`: each token repeated `diffusion_batch_mul` times, loss averaged over masked ones."""
        bsz, seq_len, _ = tokens.shape
        mul = self.config.diffusion_batch_mul
        target = tokens.reshape(bsz * seq_len, -1).repeat(mul, 1)
        z = z.reshape(bsz * seq_len, -1).repeat(mul, 1)
        m = mask.reshape(bsz * seq_len).repeat(mul)
        loss = self.head.loss(target, z, generator=generator, t=t, noise=noise)
        return (loss * m).sum() / m.sum()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
