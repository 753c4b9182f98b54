"""The NOVA adapter (`margrpo.compat.nova`) against the public contract, on a tiny random NOVA folder written in
upstream's on-disk format (`nova_tiny.py`). The shared policy / replay / ratio-is-1 tests run on it through the
`nova` entry of `families.py`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nova_tiny import TEXT_DIM, TEXT_LEN, write_tiny_nova
from safetensors.torch import load_file, save_file

from margrpo.compat import nova
from margrpo.models.weights import WeightsMismatchError


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_nova(tmp_path_factory.mktemp("nova") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return nova.load(folder)


def upstream_keys(depth_video=2, depth_image=2, depth_head=2) -> set[str]:
    """`NOVATransformer3DModel`'s state_dict keys, spelled out from upstream's module tree (not from ours)."""
    keys = {"mask_embed.bos_token", "mask_embed.mask_token", "text_embed.weight", "text_embed.proj.weight",
            "text_embed.proj.bias", "text_embed.norm.weight", "text_embed.norm.bias",
            "video_pos_embed.norm.weight", "video_pos_embed.norm.bias"}
    keys |= {f"video_pos_embed.time_proj.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for enc, depth in (("video_encoder", depth_video), ("image_encoder", depth_image)):
        keys |= {f"{enc}.patch_embed.proj.{w}" for w in ("weight", "bias")} | {f"{enc}.norm.{w}"
                                                                               for w in ("weight", "bias")}
        for i in range(depth):
            for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                keys |= {f"{enc}.blocks.{i}.{m}.{w}" for w in ("weight", "bias")}
    head = ["patch_embed.proj", "norm.proj", "head"] + [f"time_cond_embed.{p}.fc{k}" for p in
                                                        ("timestep_proj", "condition_proj") for k in (1, 2)]
    for i in range(depth_head):
        head += [f"blocks.{i}.norm1.proj", f"blocks.{i}.proj.fc1", f"blocks.{i}.proj.fc2", f"blocks.{i}.norm2"]
    keys |= {f"image_decoder.{m}.{w}" for m in head for w in ("weight", "bias")}
    return keys


# ------------------------------------------------------------------------------------------------- loading
def test_the_folder_loads_strictly_with_upstreams_keys(model, folder):
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.seq_len == 64 and model.token_embed_dim == 16 and model.image_size == 128
    sd = model.state_dict()
    own = {k for k in sd if not k.startswith(("vae.", "text_encoder."))}
    assert own == upstream_keys()
    assert set(model.policy.state_dict()) == upstream_keys()  # the policy alone: exactly upstream's file
    assert set(load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))) == upstream_keys()
    assert any(k.startswith("vae.decoder.") for k in sd) and any(k.startswith("text_encoder.layers.") for k in sd)
    assert sd["text_embed.weight"].shape == (512, TEXT_DIM)
    again = type(model)(model.transformer, model.vae, model.text_encoder, model.tokenizer)
    again.load_state_dict(sd)  # the unprefixed dict loads back into the module tree


def test_load_takes_dtype_and_flow_shift(folder):
    m = nova.load(folder, dtype=torch.bfloat16, flow_shift=3.0)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    cond = m.encode_prompts(["a red circle"])
    tokens, mask = torch.randn(1, 64, 16), torch.ones(1, 64)
    with torch.no_grad():
        z = m.compute_z(tokens, mask, cond)
        tr = m.head(torch.randn(64, 16), 0, z[0])
    assert z.dtype == torch.bfloat16 and tr.mean.dtype == torch.float32  # log-prob arithmetic stays float32
    assert m.head.scheduler.sampling_shift == 3.0


@pytest.mark.parametrize("edit,expect", [
    ("missing", ["missing", "image_decoder.head.bias"]),
    ("unexpected", ["unexpected", "label_embed.weight"]),
    ("shape", ["mismatched", "mask_embed.mask_token"]),
])
def test_loading_names_the_file_and_every_bad_key(tmp_path, edit, expect):
    path = write_tiny_nova(tmp_path / "m", text_encoder=False, vae=False)
    wfile = path / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(wfile))
    if edit == "missing":
        sd.pop("image_decoder.head.bias")
        sd.pop("video_encoder.norm.bias")
    elif edit == "unexpected":
        sd["label_embed.weight"] = torch.zeros(3)
    else:
        sd["mask_embed.mask_token"] = torch.zeros(1, 7)
    save_file(sd, str(wfile))
    with pytest.raises(WeightsMismatchError) as e:
        nova.load(path)
    msg = str(e.value)
    assert str(wfile) in msg and all(s in msg for s in expect)
    if edit == "missing":
        assert "video_encoder.norm.bias" in msg  # every key in one error


def test_sharded_weights_load(tmp_path, folder):
    path = write_tiny_nova(tmp_path / "m", text_encoder=False, vae=False)
    tdir = path / "transformer"
    sd = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    (tdir / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tdir / name))
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    m = nova.load(path)
    assert all(torch.equal(v, sd[k]) for k, v in m.policy.state_dict().items())


def test_a_folder_that_is_not_nova_is_one_clear_error(tmp_path):
    from margrpo.models.loading import load_model

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a NOVA folder: no transformer/config.json"):
        nova.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        nova.load(tmp_path / "nowhere")
    path = write_tiny_nova(tmp_path / "sd", text_encoder=False, vae=False, _class_name="SD3Transformer2DModel",
                           state={})
    with pytest.raises(ValueError, match="not a NOVA transformer"):
        nova.load(path)
    cfg_file = path / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("_class_name")
    cfg.pop("arch")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing keys \['arch'\]"):
        nova.load(path)
    with pytest.raises(ValueError, match="rotary_pos_embed"):
        nova.load(write_tiny_nova(tmp_path / "rope", text_encoder=False, vae=False, rotary_pos_embed=True,
                                  state={}))
    with pytest.raises(ValueError, match="unknown image encoder arch 'vit_d7w3'"):
        nova.load(write_tiny_nova(tmp_path / "arch", text_encoder=False, vae=False,
                                  arch=["vit_tiny_video", "vit_d7w3", "mlp_tiny"], state={}))
    with pytest.raises(ValueError, match="image_base_size"):
        nova.load(write_tiny_nova(tmp_path / "base", text_encoder=False, vae=False, image_base_size=[16, 16],
                                  state={}))
    pick = write_tiny_nova(tmp_path / "pickle", text_encoder=False, vae=False)
    (pick / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        pick / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="does not unpickle"):
        nova.load(pick)
    nosched = write_tiny_nova(tmp_path / "nosched", text_encoder=False, vae=False)
    (nosched / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_model(str(nosched), "cpu")  # `model:` dispatches to the NOVA loader
    dyn = write_tiny_nova(tmp_path / "dyn", text_encoder=False, vae=False)
    sfile = dyn / "scheduler" / "scheduler_config.json"
    sfile.write_text(json.dumps({**json.loads(sfile.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        nova.load(dyn)


# ------------------------------------------------------------------------------------------------- layout
def test_patchify_is_upstreams_layout_by_hand(model):
    b, c, h, w, p = 1, 4, 16, 16, 2
    lat = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    tok = model.patchify(lat)
    assert tok.shape == (1, 64, 16)
    for ch, y, x in [(0, 0, 0), (3, 0, 1), (1, 1, 0), (2, 5, 12), (3, 15, 15)]:
        t = (y // p) * (w // p) + x // p  # raster over the 8 x 8 patch grid
        inner = (y % p) * p * c + (x % p) * c + ch  # (p, q, channel), channel fastest
        assert tok[0, t, inner] == lat[0, ch, y, x]
    ref = lat.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, 64, 16)  # the contract's
    assert torch.equal(tok, ref) and torch.equal(model.unpatchify(tok), lat)


def test_patch_embeddings_are_upstreams_convolutions(model):
    """Tokens in the patchify layout through `patch_embed` equal upstream's conv on the latent image."""
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 16, 16, generator=g)
    tok = model.patchify(lat)
    for pe in (model.policy.image_encoder.patch_embed, model.head.patch_embed):
        ref = F.conv2d(lat, pe.proj.weight, pe.proj.bias, stride=2).flatten(2).transpose(1, 2)
        assert torch.allclose(pe(tok), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------- scheduler, head
@pytest.mark.parametrize("config_shift,flow_shift", [(1.0, None), (3.0, None), (1.0, 3.0), (3.0, 2.0), (3.0, 0)])
@pytest.mark.parametrize("steps", [25, 10])
def test_sigmas_equal_diffusers_from_the_folder(tmp_path, config_shift, flow_shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = write_tiny_nova(tmp_path / "m", shift=config_shift, text_encoder=False, vae=False)
    m = nova.load(path, flow_shift=flow_shift)
    assert m.head.num_steps == 25  # upstream's default
    m.head.set_sampling_steps(steps)
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(str(path / "scheduler"))
    if flow_shift:  # NOVAPipeline: `self.scheduler.set_shift(flow_shift) if flow_shift else None`
        ref.set_shift(flow_shift)
    ref.set_timesteps(steps)
    assert len(m.head.sigmas) == steps + 1 and m.head.sigmas[-1] == 0
    np.testing.assert_allclose(m.head.sigmas, ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    z = torch.zeros(3, 32)
    t_seen = []
    net = m.head.net
    m.head.net = lambda x, t, zz: (t_seen.append(t), net(x, t, zz))[1]  # the time input is sigma * 1000
    try:
        m.head(torch.zeros(3, 16), 1, z)
    finally:
        del m.head.net
    np.testing.assert_allclose(t_seen[0].numpy(), ref.timesteps[1].item(), rtol=1e-6)


def test_head_steps_and_guidance_on_the_velocity(model):
    head = model.head
    g = torch.Generator().manual_seed(1)
    x, z, zu = torch.randn(5, 16, generator=g), torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    j = 2
    sig = head.sigmas
    t = torch.full((5,), float(sig[j]) * 1000)
    with torch.no_grad():
        vc, vu = head.net(x, t, z), head.net(x, t, zu)
        assert head.noise_level == 0.7 and head.is_stochastic(j)
        head.noise_level = 0.0
        try:
            tr = head(x, j, z, zu, 5.0)
            assert not head.is_stochastic(j) and float(tr.std.abs().max()) == 0
            v = vu + 5.0 * (vc - vu)  # upstream's guidance, the same x_t in both branches
            assert torch.allclose(tr.mean, x + (sig[j + 1] - sig[j]) * v, atol=1e-5)  # upstream's Euler step
            assert torch.equal(head.sample_step(tr, j, None), tr.mean)
        finally:
            head.noise_level = 0.7
        tr = head(x, j, z)
        sde = head.scheduler.step(x, j, vc.float(), 1.0)
        assert torch.allclose(tr.mean, sde.mean, atol=1e-6) and float(tr.std.min()) > 0  # Flow-GRPO SDE step
        noise = torch.randn(5, 16, generator=g)
        assert torch.allclose(head.sample_step(tr, j, None, noise), tr.mean + tr.std * noise)


def test_the_head_network_is_upstreams_diffusion_mlp(model):
    """One DiffusionMLP forward written out from upstream's code (cos-then-sin time features, AdaLN-Zero blocks
    with a post-norm projector, final AdaLN, linear head)."""
    head = model.head
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(4, 16, generator=g), torch.randn(4, 32, generator=g)
    t = torch.tensor([1000.0, 512.5, 3.0, 0.0])
    with torch.no_grad():
        freq = torch.exp(-math.log(10000) * torch.arange(128) / 128)
        emb = t[:, None] * freq[None]
        tc = head.time_cond_embed
        c = tc.condition_proj.fc2(F.silu(tc.condition_proj.fc1(z))) + tc.timestep_proj.fc2(
            F.silu(tc.timestep_proj.fc1(torch.cat([emb.cos(), emb.sin()], -1))))
        lat = x.view(4, 2, 2, 4).permute(0, 3, 1, 2)  # each token as a 2 x 2 x 4-channel patch
        h = F.conv2d(lat, head.patch_embed.proj.weight, head.patch_embed.proj.bias, stride=2).flatten(1)
        for blk in head.blocks:
            scale, shift, gate = blk.norm1.proj(F.silu(c)).chunk(3, -1)
            hh = F.layer_norm(h, (32,), eps=1e-6) * (1 + scale) + shift
            h = h + blk.norm2(blk.proj.fc2(F.silu(blk.proj.fc1(hh)))) * gate
        scale, shift = head.norm.proj(F.silu(c)).chunk(2, -1)
        ref = head.head(F.layer_norm(h, (32,), eps=1e-6) * (1 + scale) + shift)
        assert torch.allclose(head.net(x, t, z), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------- AR schedule
def test_mask_schedule_by_hand(model):
    counts = model.mask_schedule(64, 1024)
    assert len(counts) == 63 and sum(counts) == 1024  # round(1024 cos(pi/128)) = 1024: step 0 predicts nothing
    assert counts[0] == 1  # 1024 - round(1022.77)
    assert counts[-1] == 25  # round(1024 cos(63 pi/128)) = round(1024 sin(pi/128)) = round(25.13)
    assert model.mask_schedule(4) == [5, 14, 21, 24]  # 64 -> 59 -> 45 -> 24 -> 0
    assert model.mask_schedule(1) == [64]


def test_condition_is_upstreams_forward(model):
    """The image encoder as upstream runs it (known tokens gathered in generation order with prev_ids, the first
    depth/2 blocks on [frame outputs; known], scatter back into the masked canvas, the rest on everything)."""
    pol = model.policy
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 64, 16, generator=g)
    order = torch.rand(2, 64, generator=g).argsort(1)
    prev_ids = order[:, :23]  # known tokens in the order they were generated
    mask = torch.ones(2, 64).scatter_(1, prev_ids, 0.0)
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        c = pol.frame_condition(cond.text)
        enc = pol.image_encoder
        x = enc.patch_embed(tokens)
        m = mask[..., None]
        x = x * (1 - m) + pol.mask_embed.mask_token * m + pol.image_space_embed  # MaskEmbed, then PosEmbed
        idx = prev_ids[..., None].expand(-1, -1, 32)
        h = torch.cat([c, x.gather(1, idx)], 1)
        for blk in enc.blocks[:1]:
            h = blk(h)
        c2, hk = h[:, :16], h[:, 16:]
        h = torch.cat([c2, x.scatter(1, idx, hk)], 1)
        for blk in enc.blocks[1:]:
            h = blk(h)
        ref = enc.norm(h)[:, 16:]
        assert torch.allclose(pol(tokens, mask, cond), ref, atol=1e-5)
        # the frame is the BOS frame: bos + time(0) + sin-cos, and only the text reaches it
        vpe = pol.video_pos_embed
        t0 = vpe.norm(vpe.time_proj(torch.cat([torch.zeros(128), torch.ones(128)])))
        frame = pol.mask_embed.bos_token + t0 + pol.video_space_embed
        v = pol.video_encoder
        hv = torch.cat([pol.text_embed(cond.text), frame.expand(2, -1, -1)], 1)
        for blk in v.blocks:
            hv = blk(hv)
        assert torch.allclose(c, v.norm(hv)[:, TEXT_LEN:], atol=1e-5)


# ------------------------------------------------------------------------------------------------- prompts
def test_prompt_features_and_the_unconditional_prompt(model):
    from transformers import AutoModel

    weight = model.policy.text_embed.weight
    raw = [torch.randn(3, TEXT_DIM), torch.randn(0, TEXT_DIM), torch.randn(TEXT_LEN, TEXT_DIM)]
    cond = model.encode_prompts(raw)
    assert cond.text.shape == (3, TEXT_LEN, TEXT_DIM) and bool(cond.text_mask.all())
    assert torch.equal(cond.text[0, :3], raw[0]) and torch.equal(cond.text[0, 3:], weight[3:TEXT_LEN])
    assert torch.equal(cond.text[1], weight[:TEXT_LEN]) and torch.equal(cond.text[2], raw[2])
    with pytest.raises(ValueError, match="raw prompt features"):
        model.encode_prompts([torch.randn(TEXT_LEN + 1, TEXT_DIM)])
    with pytest.raises(TypeError, match="not a mix"):
        model.encode_prompts(["a", torch.randn(1, TEXT_DIM)])
    # strings: Phi's last hidden state over the prompt's tokens (truncated at text_token_len), then the learned rows
    long = "a big red circle left of a small blue square right of two green triangles"
    cond = model.encode_prompts(["a red circle", long, ""])
    phi = model.text_encoder
    for i, p in enumerate(["a red circle", long]):
        ids = model.tokenizer(p, max_length=TEXT_LEN, truncation=True).input_ids
        with torch.no_grad():
            ref = phi(input_ids=torch.tensor([ids])).last_hidden_state[0]
        n = len(ids)
        assert n == (3 if i == 0 else TEXT_LEN)
        assert torch.allclose(cond.text[i, :n], ref, atol=1e-5) and torch.equal(cond.text[i, n:], weight[n:TEXT_LEN])
    assert torch.equal(cond.text[2], weight[:TEXT_LEN])  # "" is upstream's negative prompt: the unconditional one
    assert isinstance(phi, AutoModel.from_config(phi.config).__class__)
    tokens, mask = torch.randn(3, 64, 16), torch.ones(3, 64)
    with torch.no_grad():
        zu = model.compute_z(tokens, mask, None)
        assert torch.allclose(model.compute_z(tokens, mask, cond)[2], zu[2], atol=1e-6)
    assert model.encode_prompts(None) is None


def test_a_folder_without_text_encoder_takes_raw_features(tmp_path):
    m = nova.load(write_tiny_nova(tmp_path / "m", text_encoder=False, vae=False))
    assert m.text_encoder is None and not any(k.startswith("text_encoder.") for k in m.state_dict())
    with pytest.raises(ValueError, match="string prompts need text_encoder"):
        m.encode_prompts(["a red circle"])
    with pytest.raises(ValueError, match="without vae/"):
        m.decode(torch.zeros(1, 64, 16))
    cond = m.encode_prompts([torch.randn(2, TEXT_DIM)])
    with torch.no_grad():
        assert m.compute_z(torch.zeros(1, 64, 16), torch.ones(1, 64), cond).shape == (1, 64, 32)


# ------------------------------------------------------------------------------------------------- codec
def test_decode_and_encode_use_the_vae_factors(model):
    vae = model.vae
    assert vae.config.scaling_factor == 0.5 and vae.config.shift_factor == 0.1
    g = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 64, 16, generator=g)
    before = tokens.clone()
    with torch.no_grad():
        img = model.decode(tokens)
        ref = vae.decode(model.unpatchify(tokens) / 0.5 + 0.1).sample.clamp(-1, 1)
        assert torch.equal(tokens, before) and torch.allclose(img, ref, atol=1e-6)
        assert img.shape == (1, 3, 128, 128) and float(img.abs().max()) <= 1
        enc = model.encode_images(img, torch.Generator().manual_seed(7))
        post = vae.encode(img).latent_dist
        ref = model.patchify((post.sample(torch.Generator().manual_seed(7)) - 0.1) * 0.5)
        assert torch.allclose(enc, ref, atol=1e-6)


def test_save_pretrained_round_trips_the_folder(tmp_path, folder):
    m = nova.load(folder, flow_shift=2.0)
    out = m.save_pretrained(tmp_path / "saved", metadata={"steps": 3})
    for f in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "vae/config.json", "text_encoder/config.json"):
        assert (out / f).is_file(), f
    again = nova.load(out)
    assert again.head.scheduler.sampling_shift == 2.0  # the margrpo entry, ignored by diffusers
    assert json.loads((out / "transformer" / "config.json").read_text())["_margrpo"]["metadata"] == {"steps": 3}
    a, b = m.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_loss_is_finite_and_reaches_both_groups(model):
    g = torch.Generator().manual_seed(8)
    tokens = torch.randn(2, 64, 16, generator=g)
    pol = model.policy
    loss = pol.pretrain_loss(tokens, model.encode_prompts(["a red circle", "two blue squares"]), g,
                             drop_conditions=True)
    assert torch.isfinite(loss)
    loss.backward()
    for group in ("ar", "head"):
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in pol.parameter_groups()[group])
    pol.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------- training
def test_training_can_name_a_nova_folder(tmp_path):
    """`model:` names a NOVA folder: two Trainer steps with guided rollouts, and the export is a NOVA folder."""
    from margrpo.models.loading import load_model
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config

    path = write_tiny_nova(tmp_path / "nova")
    cfg = load_config(TrainConfig, None, [f"model={path}", f"out_dir={tmp_path / 'run'}", "steps=2",
                                          "rewards={colour_fraction: 1.0}", "prompts.fixed=['a red circle']",
                                          "algorithm.ptx_weight=0", "algorithm.prompts_per_step=1",
                                          "algorithm.group_size=2", "sampling.ar_steps=2",
                                          "sampling.diffusion_steps=4", "sampling.guidance_scale=2.0",
                                          "sampling.guidance_schedule=constant", "log.tensorboard=false"])
    rows = Trainer(cfg, progress=False).run()
    assert len(rows) == 2
    export = tmp_path / "run" / "model"
    assert (export / "transformer" / "config.json").is_file()
    trained = load_model(str(export), "cpu")
    assert type(trained).__name__ == "NOVAImageModel" and set(trained.state_dict()) == set(nova.load(path).state_dict())
    assert (tmp_path / "run" / "checkpoints").is_dir()
    from_run = load_model(str(tmp_path / "run"), "cpu")  # the run directory: base folder + the last checkpoint
    a, b = from_run.state_dict(), trained.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_text_encoder_with_missing_weights_is_an_error(tmp_path):
    path = write_tiny_nova(tmp_path / "m", vae=False)
    wfile = path / "text_encoder" / "model.safetensors"
    sd = load_file(str(wfile))
    sd.pop("model.final_layernorm.weight")
    save_file(sd, str(wfile), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layernorm.weight"):
        nova.load(path)
    shutil.rmtree(path / "tokenizer")
    with pytest.raises(FileNotFoundError, match="without tokenizer"):
        nova.load(path)
