"""KL-16 autoencoder: upstream-compatible state-dict layout, forward math, and the checkpoint loader.

Expected keys/shapes are derived by hand from LTH14/mar `models/vae.py` (module tree of `Encoder`,
`Decoder`, `AutoencoderKL`), independently of our implementation, so a structural drift that would
break loading the released `kl16.ckpt` fails here without needing the 300 MB file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from margrpo.compat.kl16 import KL16CheckpointError, load_kl16, load_kl16_with_report
from margrpo.models.codecs import AutoencoderCodec
from margrpo.models.vae import (
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussian,
    Downsample,
    ResnetBlock,
    Upsample,
)

torch.set_num_threads(1)

# Tiny config: stride 4, attention in the encoder's lowest level (nominal res 32 // 4 = 8), none in
# the decoder (upstream's asymmetry), 4 GroupNorm groups so channels can be 8/16.
TINY = {
    "embed_dim": 4,
    "ch_mult": (1, 2, 2),
    "ch": 8,
    "num_res_blocks": 1,
    "resolution": 32,
    "encoder_attn_resolutions": (8,),
    "decoder_attn_resolutions": (),
    "num_groups": 4,
}


def _tiny(seed: int = 0, **kw) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(**{**TINY, **kw}).eval()
    # Default GroupNorm affine is (1, 0); randomise so a transposed/misrouted norm would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm" in name or "norm_out" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------------
# (a) state-dict keys
# ----------------------------------------------------------------------------------------------


def _resnet(prefix: str, cin: int, cout: int) -> list[str]:
    names = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if cin != cout else [])
    return [f"{prefix}.{n}.{p}" for n in names for p in ("weight", "bias")]


def _attn(prefix: str) -> list[str]:
    return [f"{prefix}.{n}.{p}" for n in ("norm", "q", "k", "v", "proj_out") for p in ("weight", "bias")]


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def expected_keys(
    ch: int, ch_mult: tuple[int, ...], nrb: int, enc_attn: set[int], dec_attn: set[int]
) -> set[str]:
    """Upstream's key layout, written out from the structure of LTH14/mar models/vae.py."""
    n = len(ch_mult)
    keys = _wb("encoder.conv_in")
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(nrb):
            keys += _resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i in enc_attn:
                keys += _attn(f"encoder.down.{i}.attn.{j}")
        if i != n - 1:
            keys += _wb(f"encoder.down.{i}.downsample.conv")
    for side in ("encoder", "decoder"):
        keys += _resnet(f"{side}.mid.block_1", 1, 1) + _attn(f"{side}.mid.attn_1")
        keys += _resnet(f"{side}.mid.block_2", 1, 1)
        keys += _wb(f"{side}.norm_out") + _wb(f"{side}.conv_out")
    keys += _wb("decoder.conv_in")
    cin = ch * ch_mult[-1]
    for i in reversed(range(n)):
        for j in range(nrb + 1):  # decoder levels have one extra block
            keys += _resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
            if i in dec_attn:
                keys += _attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            keys += _wb(f"decoder.up.{i}.upsample.conv")
    keys += _wb("quant_conv") + _wb("post_quant_conv")
    return set(keys)


def test_tiny_key_set_matches_upstream_layout() -> None:
    sd = AutoencoderKL(**TINY, device="meta").state_dict()
    assert set(sd) == expected_keys(8, (1, 2, 2), 1, enc_attn={2}, dec_attn=set())
    # A few spot keys, including upstream's asymmetry (encoder attention only) and the up.{i} order.
    for k in (
        "encoder.down.2.attn.0.q.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "decoder.up.2.block.1.conv2.bias",
        "decoder.up.1.upsample.conv.weight",
    ):
        assert k in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.2.downsample.conv.weight" not in sd
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up"))
    assert not any("temb_proj" in k or "conv_shortcut" in k for k in sd)
    # up.1 sits at the same resolution as down.1: its first block maps 16 -> 16, its upsample is 16 wide.
    assert sd["decoder.up.1.upsample.conv.weight"].shape == (16, 16, 3, 3)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (8, 16, 1, 1)
    # With decoder attention switched on, the same derivation must hold.
    sd2 = AutoencoderKL(**{**TINY, "decoder_attn_resolutions": (16,)}, device="meta").state_dict()
    assert set(sd2) == expected_keys(8, (1, 2, 2), 1, enc_attn={2}, dec_attn={1})


def test_full_kl16_layout_and_shapes() -> None:
    """Upstream `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`: 312 tensors, 66,456,019 params."""
    sd = AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4), device="meta").state_dict()
    assert set(sd) == expected_keys(128, (1, 1, 2, 2, 4), 2, enc_attn={4}, dec_attn=set())
    assert len(sd) == 312
    assert sum(v.numel() for v in sd.values()) == 66_456_019
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.norm.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),  # double_z: mean and logvar
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.4.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


# ----------------------------------------------------------------------------------------------
# (b) save the upstream way, load through load_kl16
# ----------------------------------------------------------------------------------------------


def test_upstream_format_roundtrip(tmp_path: Path) -> None:
    model = _tiny()
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": model.state_dict()}, path)
    loaded, report = load_kl16_with_report(path, num_groups=4, resolution=32)
    assert report.config == model.config  # ch, ch_mult, z/embed dims and attention placement inferred
    # Attention placement is by level; with the default nominal resolution 256 it reads as (64,).
    assert load_kl16_with_report(path, num_groups=4)[1].config["encoder_attn_resolutions"] == (64,)
    assert report.ignored_keys == ()
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
        assert torch.equal(a.parameters, b.parameters)
        assert torch.equal(model.decode(a.mean), loaded.decode(b.mean))


def test_safetensors_and_training_extras(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = _tiny(seed=1)
    sd = model.state_dict()
    st = tmp_path / "kl16.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    assert all(torch.equal(v, load_kl16(st, num_groups=4).state_dict()[k]) for k, v in sd.items())

    # LDM-style: {"state_dict": ...} with LPIPS/discriminator state under loss.* -> ignored, reported.
    extras = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)}
    lt = tmp_path / "ldm.ckpt"
    torch.save({"state_dict": {**sd, **extras}, "global_step": 7}, lt)
    loaded, report = load_kl16_with_report(lt, num_groups=4, dtype=torch.float64)
    assert set(report.ignored_keys) == set(extras)
    assert next(loaded.parameters()).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# (c) shapes, tokenizer scaling, posterior clamp
# ----------------------------------------------------------------------------------------------


def test_encode_decode_shapes_and_tokenizer() -> None:
    vae = _tiny()
    tok = AutoencoderCodec(vae, scale=0.2325, patch_size=2)
    assert not any(p.requires_grad for p in vae.parameters())
    assert tok.stride == 4 and tok.token_dim == 16 and tok.latent_shape(16, 24) == (4, 4, 6)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert post.mean.shape == post.std.shape == (2, 4, 4, 6)
        assert vae.decode(post.sample()).shape == x.shape
        z = tok.encode(x, sample=False)
        torch.testing.assert_close(z, post.mean * 0.2325, rtol=0, atol=0)
        zs1 = tok.encode(x, generator=torch.Generator().manual_seed(5))
        zs2 = tok.encode(x, generator=torch.Generator().manual_seed(5))
        assert torch.equal(zs1, zs2) and not torch.equal(zs1, z)
        z_copy = z.clone()
        img = tok.decode(z)
        assert torch.equal(z, z_copy)  # Harmon divides in place; we do not
        assert torch.equal(img, vae.decode(z / 0.2325))
    tok.train()
    assert not vae.training


def test_posterior_logvar_clamp() -> None:
    mean = torch.randn(1, 3, 2, 2)
    logvar = torch.tensor([-100.0, 0.0, 100.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mean, mean) and torch.equal(post.mode(), mean)
    torch.testing.assert_close(post.logvar[0, :, 0, 0], torch.tensor([-30.0, 0.0, 20.0]))
    torch.testing.assert_close(post.std[0, :, 0, 0], torch.exp(torch.tensor([-15.0, 0.0, 10.0])))
    assert torch.isfinite(post.kl()).all()
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(post.sample(generator=g), mean + post.std * eps)
    det = DiagonalGaussian(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert torch.equal(det.sample(), mean)


# ----------------------------------------------------------------------------------------------
# (d) loader errors name the key and the file
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        ("drop", "decoder.up.1.block.1.conv1.bias", "missing keys"),
        ("reshape", "encoder.mid.attn_1.q.weight", "expected (16, 16, 1, 1), found (16, 16, 3, 3)"),
        ("add", "encoder.mid.attn_2.q.weight", "unexpected keys"),
    ],
)
def test_loader_errors(tmp_path: Path, edit: str, key: str, fragment: str) -> None:
    sd = AutoencoderKL(**TINY).state_dict()
    if edit == "drop":
        del sd[key]
    elif edit == "reshape":
        sd[key] = torch.zeros(16, 16, 3, 3)
    else:
        sd[key] = torch.zeros(16, 16, 1, 1)
    path = tmp_path / f"bad_{edit}.ckpt"
    torch.save({"model": sd}, path)
    with pytest.raises(KL16CheckpointError) as info:
        load_kl16(path, num_groups=4)
    msg = str(info.value)
    assert key in msg and str(path) in msg and fragment in msg


def test_loader_refuses_foreign_pickles_unless_allow_listed(tmp_path: Path) -> None:
    sd = AutoencoderKL(**TINY).state_dict()
    path = tmp_path / "with_args.ckpt"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(KL16CheckpointError, match="weights_only") as info:
        load_kl16(path, num_groups=4)
    assert str(path) in str(info.value)
    if hasattr(torch.serialization, "safe_globals"):
        assert load_kl16(path, num_groups=4, safe_globals=[argparse.Namespace]) is not None
    with pytest.raises(KL16CheckpointError, match="encoder.conv_in.weight"):
        torch.save({"model": {"quant_conv.weight": torch.zeros(1)}}, tmp_path / "junk.ckpt")
        load_kl16(tmp_path / "junk.ckpt")


# ----------------------------------------------------------------------------------------------
# (e) forward math against torch.nn.functional, written from upstream's forward()
# ----------------------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def _gn(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    return F.group_norm(x, 4, norm.weight, norm.bias, eps=1e-6)


def _sw(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def test_resnet_block_math() -> None:
    torch.manual_seed(0)
    blk = ResnetBlock(8, 12, num_groups=4)
    _randomize(blk)
    x = torch.randn(2, 8, 5, 6)
    h = F.conv2d(_sw(_gn(x, blk.norm1)), blk.conv1.weight, blk.conv1.bias, padding=1)
    h = F.conv2d(_sw(_gn(h, blk.norm2)), blk.conv2.weight, blk.conv2.bias, padding=1)
    ref = F.conv2d(x, blk.nin_shortcut.weight, blk.nin_shortcut.bias) + h
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_attention_block_math() -> None:
    torch.manual_seed(1)
    blk = AttnBlock(8, num_groups=4)
    _randomize(blk)
    x = torch.randn(2, 8, 3, 5)
    hn = _gn(x, blk.norm)
    q, k, v = (F.conv2d(hn, m.weight, m.bias).flatten(2) for m in (blk.q, blk.k, blk.v))  # [B, C, N]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 8**0.5, dim=-1)  # query i, key j
    out = torch.einsum("bij,bcj->bci", w, v).reshape(x.shape)
    ref = x + F.conv2d(out, blk.proj_out.weight, blk.proj_out.bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)


def test_resampling_math() -> None:
    torch.manual_seed(2)
    down, up = Downsample(4), Upsample(4)
    x = torch.randn(1, 4, 6, 6)
    # Asymmetric: one zero row/column appended at the bottom/right only, then stride 2, no padding.
    padded = torch.zeros(1, 4, 7, 7)
    padded[:, :, :6, :6] = x
    ref_down = F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2)
    nearest = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    ref_up = F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1)
    with torch.no_grad():
        assert down(x).shape == (1, 4, 3, 3)
        torch.testing.assert_close(down(x), ref_down)
        torch.testing.assert_close(up(x), ref_up)
