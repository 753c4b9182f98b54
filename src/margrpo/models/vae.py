"""The KL-regularised convolutional autoencoder ("KL-16") that MAR and Harmon tokenize images with.

This is a clean re-implementation of the LDM/taming-style `AutoencoderKL` used by LTH14/mar
(`models/vae.py`) and copied unchanged by Harmon. Only the *facts* are carried over: the module tree,
and therefore every state-dict key and tensor shape, is identical to upstream so that the released
`kl16.ckpt` loads without renaming (see `margrpo.compat.kl16.load_kl16`). The forward math is also
identical, op for op, because the MAR prior was trained on this exact latent distribution; a
"harmless" change (e.g. symmetric padding in the downsampler, a different softmax scale) would shift
the latents the prior expects.

Upstream facts this file relies on (upstream `AutoencoderKL(embed_dim, ch_mult)` builds both halves
with their defaults and only overrides `ch_mult` and `z_channels=embed_dim`):

* `ch=128`, `num_res_blocks=2`, `resolution=256`, `in_channels=out_ch=3`, `dropout=0.0`,
  `resamp_with_conv=True`, `double_z=True` (the encoder emits 2*z_channels: mean and log-variance).
* The encoder attends at `attn_resolutions=(16,)`, the decoder at `()` (asymmetric: the decoder's
  default is empty and upstream never overrides it). "Resolution" is nominal, `resolution // 2**level`,
  not the size of the actual input.
* GroupNorm(32 groups, eps=1e-6, affine), swish `x * sigmoid(x)`, no timestep embedding
  (`temb_ch = 0`, hence no `temb_proj` weights), 1x1 `nin_shortcut` when channels change.
* Downsample: zero-pad (left 0, right 1, top 0, bottom 1) then a 3x3 stride-2 conv with no padding.
  Upsample: nearest x2 then a 3x3 conv.
* Attention: single head over all positions, 1x1 convs `q, k, v, proj_out`, scale `C ** -0.5`.
* `quant_conv` 1x1 (2*z -> 2*embed), `post_quant_conv` 1x1 (embed -> z); with `z_channels == embed_dim`
  (upstream's only case) these are (2e -> 2e) and (e -> e).
* The posterior clamps the log-variance to [-30, 20] before exponentiating.
* The latent scale 0.2325 is *not* part of the autoencoder; MAR multiplies after sampling and divides
  before decoding. `codecs.AutoencoderCodec` does that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "KL16_LATENT_SCALE",
    "AttnBlock",
    "AutoencoderKL",
    "Decoder",
    "DiagonalGaussian",
    "Downsample",
    "Encoder",
    "ResnetBlock",
    "Upsample",
    "swish",
]

KL16_LATENT_SCALE = 0.2325
"""MAR's normalisation of KL-16 latents to unit std (`posterior.sample().mul_(0.2325)`)."""


def swish(x: torch.Tensor) -> torch.Tensor:
    """Swish written as upstream writes it (`x * sigmoid(x)`), so results match bit for bit."""
    return x * torch.sigmoid(x)


def _norm(channels: int, num_groups: int, factory: dict[str, Any]) -> nn.GroupNorm:
    """Upstream's `Normalize`: GroupNorm with eps=1e-6 (not PyTorch's default 1e-5) and affine."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True, **factory)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then (by default) a 3x3 conv; key `upsample.conv`."""

    def __init__(self, channels: int, with_conv: bool = True, *, device: Any = None, dtype: Any = None):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Halves H and W: pad right/bottom by one zero, then a 3x3 stride-2 conv without padding.

    The asymmetric pad is what upstream trained with; `padding=1` would shift the sampling grid by
    one pixel and change every latent.
    """

    def __init__(self, channels: int, with_conv: bool = True, *, device: Any = None, dtype: Any = None):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-swish-conv, norm-swish-dropout-conv, plus a 1x1 shortcut.

    Upstream's block also supports a timestep embedding and a 3x3 `conv_shortcut`; the autoencoder
    uses neither (no `temb_proj`/`conv_shortcut` weights exist in the checkpoint), so they are absent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        dropout: float = 0.0,
        num_groups: int = 32,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        f = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        # Registration order follows upstream so state_dict() key order matches too.
        self.norm1 = _norm(in_channels, num_groups, f)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, **f)
        self.norm2 = _norm(out_channels, num_groups, f)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, **f)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, *, num_groups: int = 32, device: Any = None, dtype: Any = None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.channels = channels
        self.norm = _norm(channels, num_groups, f)
        self.q = nn.Conv2d(channels, channels, 1, **f)
        self.k = nn.Conv2d(channels, channels, 1, **f)
        self.v = nn.Conv2d(channels, channels, 1, **f)
        self.proj_out = nn.Conv2d(channels, channels, 1, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # [B, N, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, N]
        v = self.v(h).reshape(b, c, hh * ww)  # [B, C, N]
        # Explicit bmm + softmax (not SDPA) to keep upstream's op order and hence its rounding.
        weights = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # [B, Nq, Nk]
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Stage(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (possibly empty) and an optional resampler.

    Upstream uses bare `nn.Module()` containers; the attribute names are what fix the state-dict keys.
    """

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)


class _Mid(nn.Module):
    """Bottleneck `block_1 -> attn_1 -> block_2` shared by encoder and decoder."""

    def __init__(self, channels: int, dropout: float, num_groups: int, factory: dict[str, Any]):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups, **factory)
        self.attn_1 = AttnBlock(channels, num_groups=num_groups, **factory)
        self.block_2 = ResnetBlock(channels, channels, dropout=dropout, num_groups=num_groups, **factory)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _run_stage(stage: _Stage, h: torch.Tensor) -> torch.Tensor:
    """Upstream interleaves block i with attn i when the level has attention."""
    use_attn = len(stage.attn) > 0
    for i, block in enumerate(stage.block):
        h = block(h)
        if use_attn:
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2*z_channels (double_z) or z_channels, H/f, W/f].

    f = 2 ** (len(ch_mult) - 1); level i works at `ch * ch_mult[i]` channels.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int = 3,
        resolution: int = 256,
        z_channels: int = 16,
        double_z: bool = True,
        num_groups: int = 32,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stride=1, padding=1, **f)

        in_mult = (1, *ch_mult)
        res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            block_in = ch * in_mult[level]
            block_out = ch * mult
            blocks: list[ResnetBlock] = []
            attns: list[AttnBlock] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=num_groups, **f))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups=num_groups, **f))
            stage = _Stage(blocks, attns)
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv, **f)
                res //= 2
            self.down.append(stage)

        self.mid = _Mid(block_in, dropout, num_groups, f)
        self.norm_out = _norm(block_in, num_groups, f)
        out = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out, 3, stride=1, padding=1, **f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, stage in enumerate(self.down):
            h = _run_stage(stage, h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f].

    `up[i]` is the level at the same resolution as the encoder's `down[i]` (upstream builds from the
    lowest resolution and prepends), and each level has `num_res_blocks + 1` ResnetBlocks.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        resolution: int = 256,
        z_channels: int = 16,
        num_groups: int = 32,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, stride=1, padding=1, **f)
        self.mid = _Mid(block_in, dropout, num_groups, f)

        stages: list[_Stage] = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            blocks: list[ResnetBlock] = []
            attns: list[AttnBlock] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=num_groups, **f))
                block_in = block_out
                if res in attn_resolutions:
                    attns.append(AttnBlock(block_in, num_groups=num_groups, **f))
            stage = _Stage(blocks, attns)
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv, **f)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)

        self.norm_out = _norm(block_in, num_groups, f)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, stride=1, padding=1, **f)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            h = _run_stage(stage, h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, diag(exp(logvar))) from moments [B, 2C, h, w] split on the channel axis.

    The log-variance is clamped to [-30, 20] exactly as upstream, which keeps `std` finite and
    nonzero for any encoder output. `parameters` keeps the raw moments (what MAR caches to disk).
    """

    LOGVAR_MIN = -30.0
    LOGVAR_MAX = 20.0

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, self.LOGVAR_MIN, self.LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps.

        As upstream, eps is float32 and drawn on the generator's device (the CPU global generator
        when `generator is None`, which is what upstream's `torch.randn(shape)` uses), then moved to
        the posterior's device: seeded runs reproduce upstream's noise. A bf16/fp16 posterior
        therefore yields a float32 sample, again as upstream.
        """
        noise_device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The posterior mean (deterministic encoding)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, h, w: [B]. Training diagnostic only."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample) summed over C, h, w: [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3]
        )


class AutoencoderKL(nn.Module):
    """KL autoencoder with upstream's module tree: `encoder`, `decoder`, `quant_conv`, `post_quant_conv`.

    Defaults reproduce `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` from LTH14/mar, i.e. the
    `kl16.ckpt` architecture (stride 16, 16 latent channels). Everything is configurable so tests can
    build tiny models; `num_groups` must divide every channel count (with the default 32 that means
    `ch` a multiple of 32). `z_channels` defaults to `embed_dim`, upstream's only configuration.
    Upstream's non-variational mode (`use_variational=False`) is not supported.
    """

    def __init__(
        self,
        embed_dim: int = 16,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        *,
        ch: int = 128,
        num_res_blocks: int = 2,
        z_channels: int | None = None,
        in_channels: int = 3,
        out_ch: int = 3,
        resolution: int = 256,
        encoder_attn_resolutions: Sequence[int] = (16,),
        decoder_attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        num_groups: int = 32,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        z_channels = embed_dim if z_channels is None else z_channels
        f = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.z_channels = z_channels
        self.config: dict[str, Any] = {
            "embed_dim": embed_dim,
            "ch_mult": tuple(ch_mult),
            "ch": ch,
            "num_res_blocks": num_res_blocks,
            "z_channels": z_channels,
            "in_channels": in_channels,
            "out_ch": out_ch,
            "resolution": resolution,
            "encoder_attn_resolutions": tuple(encoder_attn_resolutions),
            "decoder_attn_resolutions": tuple(decoder_attn_resolutions),
            "dropout": dropout,
            "resamp_with_conv": resamp_with_conv,
            "num_groups": num_groups,
        }
        common = {
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": num_res_blocks,
            "dropout": dropout,
            "resamp_with_conv": resamp_with_conv,
            "resolution": resolution,
            "z_channels": z_channels,
            "num_groups": num_groups,
            **f,
        }
        self.encoder = Encoder(
            in_channels=in_channels, attn_resolutions=encoder_attn_resolutions, double_z=True, **common
        )
        self.decoder = Decoder(out_ch=out_ch, attn_resolutions=decoder_attn_resolutions, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1, **f)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1, **f)

    @property
    def downsample_factor(self) -> int:
        """Spatial stride of the latent grid (16 for KL-16)."""
        return 2 ** (len(self.config["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images in [-1, 1], [B, 3, H, W] with H, W multiples of the stride -> posterior over latents."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images (approximately [-1, 1], not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (upstream's forward is a dangling training hook; this is LDM's)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z.to(self.post_quant_conv.weight.dtype)), posterior
