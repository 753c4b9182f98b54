"""Harmon (wusize/Harmon) against upstream's files and semantics: strict loading of the `.pth` + LLM folder + kl16,
the prompt template, the prompt KV cache (reused, trimmed, equal to a full recompute), the DDPM head's guidance, MAR's
mask schedule, the VAE scaling, the token grid, the folder format and a training run that names it.

The family contract (statelessness, drop/None, ratio-is-1, replay, batched steps) runs on the same tiny model through
the "harmon" entry of `families.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harmon_files import LOAD_KW, shared_files, write_tiny_harmon

from margrpo.compat import harmon
from margrpo.models.harmon import HarmonCondition


@pytest.fixture(scope="module")
def files():
    return shared_files()


@pytest.fixture(scope="module")
def model(files):
    return harmon.load(files["pth"], llm=files["llm"], vae=files["vae"], **LOAD_KW)


def _canvas(model, known: int, seed: int = 0, bsz: int = 2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(bsz, model.seq_len, model.token_embed_dim, generator=g)
    order = torch.rand(bsz, model.seq_len, generator=g).argsort(1)
    mask = torch.ones(bsz, model.seq_len)
    mask.scatter_(1, order[:, :known], 0.0)
    return tokens, mask


def test_loads_upstream_files_strictly_with_upstream_key_names(files, model):
    sd = torch.load(files["pth"], weights_only=True)
    vae_sd = torch.load(files["vae"], weights_only=True)["model"]
    own = model.state_dict()
    assert set(own) == set(sd) | {"llm.lm_head.weight"} | {f"vae.{k}" for k in vae_sd}
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    assert all(torch.equal(own[f"vae.{k}"], v.float()) for k, v in vae_sd.items())  # fp16 file, float32 model
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight  # tied, listed in state_dict()
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert model.mar.config.attn_dropout == 0.1  # upstream's dropout: replay must switch it off (family tests)
    assert model.image_shape == (4, 4) and model.seq_len == 16 and model.image_size == 16
    # the trainable groups are mar's (MAR-GRPO trains `mar` only); the LLM and the projectors are a group of their
    # own that `algorithm.train` never names
    groups = model.policy.parameter_groups()
    assert {n.split(".")[0] for g in ("ar", "head") for n, _ in groups[g]} == {"mar"}
    assert {n.split(".")[0] for n, _ in groups["llm"]} == {"llm", "proj_in", "proj_out"}
    assert not {n for n, _ in model.trainable_parameters("both")} & {n for n, _ in groups["llm"]}
    assert {n for n, _ in groups["head"]} == {f"mar.diffloss.{n}" for n, _ in model.mar.diffloss.named_parameters()}


def test_vae_keys_in_the_pth_win_over_vae_file(tmp_path, files):
    own = write_tiny_harmon(tmp_path / "with-vae", with_vae_keys=True)
    sd = torch.load(own["pth"], weights_only=True)
    with torch.no_grad():
        other = {k: v + 1 for k, v in torch.load(files["vae"], weights_only=True)["model"].items()}
    torch.save({"model": other}, tmp_path / "other-kl16.ckpt")
    m = harmon.load(own["pth"], llm=own["llm"], vae=tmp_path / "other-kl16.ckpt", **LOAD_KW)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items() if k.startswith("vae."))


def test_the_prompt_template_by_hand(model):
    tok = model.text_tokenizer
    ids, mask = model.tokenize(["a cat", "two blue squares on the left"])
    want = ["<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n",
            "<|im_start|>user\nGenerate an image: two blue squares on the left<|im_end|>\n<|im_start|>assistant\n"]
    for row, text in enumerate(want):
        n = int(mask[row].sum())
        assert tok.decode(ids[row, :n].tolist()) == text
        assert ids[row, :n].tolist() == tok.encode(text, add_special_tokens=True)
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padded
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0, 0] == start and (ids[0] == end).sum() == 1  # special tokens are single ids
    assert tok.decode(model.policy.uncond_input_ids[0].tolist()) == (
        "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n")
    cond = model.encode_prompts(["a cat", "two blue squares on the left"])
    assert isinstance(cond, HarmonCondition) and torch.equal(cond.input_ids[mask], ids[mask])
    assert cond.past_key_values.get_seq_length() == ids.shape[1]
    assert model.encode_prompts(None) is None
    with pytest.raises(TypeError, match="string prompts"):
        model.encode_prompts([3, 7])


def _upstream_z(model, tokens, mask, cond):
    """Upstream's forward with no cache (`prepare_forward_input(past_key_values=None)`): the LLM over
    [prompt embeddings; image tokens] in one call, positions cumsum(mask) - 1, pad keys masked."""
    mar, buf = model.mar, model.mar.buffer_size
    b = tokens.shape[0]
    fake = mar.fake_latent.unsqueeze(1).expand(b, buf, -1)
    x_enc, valid = mar.forward_mae_encoder(tokens, mask, fake)
    assert valid is None
    z_enc = model.proj_in(x_enc)
    z_enc = torch.cat([z_enc[:, buf:], z_enc[:, :buf]], dim=1)
    attn = torch.cat([cond.attention_mask, cond.attention_mask.new_ones(b, z_enc.shape[1])], dim=1)
    pos = (torch.cumsum(attn, dim=1) - 1).clamp(min=0)
    embeds = torch.cat([model.llm.get_input_embeddings()(cond.input_ids), z_enc], dim=1)
    h = model.llm.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos).last_hidden_state
    h = h[:, -z_enc.shape[1]:]
    h = torch.cat([h[:, -buf:], h[:, :-buf]], dim=1)
    return mar.forward_mae_decoder(x_enc + model.proj_out(h), mask)


def test_the_prompt_cache_is_reused_trimmed_and_equals_a_full_recompute(model):
    cond = model.encode_prompts(["a red circle", "two blue squares on the left"])
    t = cond.prompt_length
    tokens, mask = _canvas(model, known=6)
    with torch.no_grad():
        z = model.policy(tokens, mask, cond)
        assert cond.past_key_values.get_seq_length() == t  # trimmed back to the prompt
        assert torch.equal(z, model.policy(tokens, mask, cond))  # z twice the same
        full = _upstream_z(model, tokens, mask, cond)
    assert (z - full).abs().max() < 1e-5
    # with gradients: each call's graph is its own (the trimmed cache keeps no part of it)
    params = [p for _, p in model.trainable_parameters("ar")]
    try:
        for _ in range(2):
            model.policy(tokens, mask, cond).square().sum().backward()
            assert cond.past_key_values.get_seq_length() == t
        assert all(not layer.keys.requires_grad for layer in cond.past_key_values.layers)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_guidance_on_eps_only_with_the_conditional_variance(model):
    head = model.head
    head.set_sampling_steps(6)
    s = head.gen_schedule
    g = torch.Generator().manual_seed(1)
    x, z, zu = (torch.randn(5, n, generator=g) for n in (16, 32, 32))
    for j in (0, 3, head.num_steps - 1):
        idx = head.num_steps - 1 - j
        t = torch.full((5,), int(s.timestep_map[idx]), dtype=torch.long)
        with torch.no_grad():
            out_c, out_u = head.net(x, t, z), head.net(x, t, zu)
            tr = head.transition(x, j, z, zu, guidance=3.0, temperature=0.7)
        assert out_c.shape == (5, 32)
        eps = out_u[:, :16] + 3.0 * (out_c[:, :16] - out_u[:, :16])
        frac = (out_c[:, 16:] + 1) / 2  # learned range, from the conditional branch
        log_var = frac * math.log(s.betas[idx]) + (1 - frac) * s.posterior_log_variance_clipped[idx]
        x0 = s.sqrt_recip_alphas_cumprod[idx] * x - s.sqrt_recipm1_alphas_cumprod[idx] * eps  # no clipping
        mean = s.posterior_mean_coef1[idx] * x0 + s.posterior_mean_coef2[idx] * x
        assert torch.allclose(tr.mean, mean, atol=1e-5, rtol=1e-5)
        assert torch.allclose(tr.std, torch.exp(0.5 * log_var) * 0.7, atol=1e-6, rtol=1e-5)  # temperature: noise only
        assert head.is_stochastic(j) == (j != head.num_steps - 1)  # the last step is deterministic
    assert all(a.dtype == np.float64 for a in (s.betas, s.alphas_cumprod, s.posterior_variance))


@pytest.mark.parametrize("steps,seq_len", [(64, 1024), (64, 256), (4, 16), (16, 16)])
def test_the_mask_schedule_is_mars(model, steps, seq_len):
    """Upstream's loop: after step k, floor(L cos(pi/2 (k+1)/S)) stay masked, clamped to [1, masked - 1]."""
    masked, counts = seq_len, []
    for k in range(steps):
        nxt = max(1, min(masked - 1, math.floor(seq_len * np.cos(math.pi / 2.0 * (k + 1) / steps))))
        if k == steps - 1:
            nxt = 0
        counts.append(masked - nxt)
        masked = nxt
    assert model.mask_schedule(steps, seq_len) == counts


def test_encode_and_decode_use_the_vae_scale_and_leave_tokens_alone(model):
    g = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        tokens = model.encode_images(images)
        latents = model.vae.encode(images).mode() * 0.2325
        assert torch.equal(tokens, latents.permute(0, 2, 3, 1).reshape(2, 16, 16))  # patch 1, raster order
        before = tokens.clone()
        out = model.decode(tokens)
        assert torch.equal(tokens, before)
        assert torch.equal(out, model.vae.decode(latents / 0.2325).clamp(-1, 1))
        assert torch.equal(model.unpatchify(model.patchify(latents)), latents)


def test_another_token_grid_interpolates_position_embeddings(files):
    m = harmon.load(files["pth"], llm=files["llm"], vae=files["vae"], **LOAD_KW)
    m.image_shape = (6, 5)
    assert m.seq_len == 30 and m.image_size == 24
    pe = m.mar.encoder_pos_embed_learned
    got = m.mar.get_encoder_pos_embed((6, 5))
    img = pe[:, 4:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(img, size=(6, 5), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 30, -1)
    assert torch.equal(got[:, :4], pe[:, :4]) and torch.allclose(got[:, 4:], want)
    assert m.mar.get_encoder_pos_embed((4, 4)) is pe  # the native grid: MAR's own parameter
    tokens, mask = _canvas(m, known=10)
    with torch.no_grad():
        z = m.policy(tokens, mask, m.encode_prompts(["a cat", "a dog"]))
        assert z.shape == (2, 30, 32) and torch.isfinite(z).all()
        assert m.decode(tokens).shape == (2, 3, 24, 20)


def test_clear_errors(tmp_path, files):
    sd = torch.load(files["pth"], weights_only=True)
    with pytest.raises(harmon.HarmonCheckpointError, match=r"harmon\.pth: has no vae\.\* keys; pass vae="):
        harmon.load(files["pth"], llm=files["llm"], **LOAD_KW)
    with pytest.raises(ValueError, match="needs llm="):
        harmon.load(files["pth"], vae=files["vae"], **LOAD_KW)
    broken = dict(sd)
    del broken["proj_out.2.bias"], broken["llm.model.norm.weight"]
    broken["mar.extra"] = torch.zeros(1)
    broken["proj_in.0.weight"] = torch.zeros(3, 3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(harmon.HarmonCheckpointError) as e:
        harmon.load(tmp_path / "broken.pth", llm=files["llm"], vae=files["vae"], **LOAD_KW)
    msg = str(e.value)
    assert str(tmp_path / "broken.pth") in msg
    for key in ("proj_out.2.bias", "llm.model.norm.weight", "mar.extra", "proj_in.0.weight"):
        assert key in msg
    with pytest.raises(harmon.HarmonCheckpointError, match="does not say encoder_num_heads"):
        harmon.load(files["pth"], llm=files["llm"], vae=files["vae"])  # a custom width: heads must be given
    torch.save({"model": sd}, tmp_path / "nested.pth")
    with pytest.raises(harmon.HarmonCheckpointError, match="flat"):
        harmon.load(tmp_path / "nested.pth", llm=files["llm"], vae=files["vae"], **LOAD_KW)


def test_convert_writes_a_folder_that_training_can_name(tmp_path, files, model, capsys):
    """`margrpo convert harmon` writes the HF-format folder; `model:` names it; two training steps run on it and
    export a folder of the same format."""
    from margrpo.cli import main
    from margrpo.models.loading import load_model
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config

    out = tmp_path / "harmon"
    args = ["convert", "harmon", str(files["pth"]), str(out), "--vae", str(files["vae"])]
    heads = [a for kv in ("encoder_num_heads=2", "decoder_num_heads=2", "num_sampling_steps=6")
             for a in ("--mar-arg", kv)]
    assert main(args + heads) == 2 and "--llm" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--llm", str(files["llm"])]) == 2  # a custom width: the heads must be given
    assert "encoder_num_heads" in capsys.readouterr().err
    assert main(args + ["--llm", str(files["llm"]), *heads]) == 0
    spec = json.loads((out / "config.json").read_text())
    assert spec["llm"]["model_type"] == "qwen2" and spec["mar"]["type"] == "custom"
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert "llm.lm_head.weight" not in keys and any(k.startswith("vae.") for k in keys)
    loaded = load_model(str(out), "cpu")
    assert type(loaded).__name__ == "HarmonImageModel" and not loaded.training
    tokens, mask = _canvas(model, known=5)
    with torch.no_grad():
        prompts = ["a red circle", "two blue squares"]
        assert torch.equal(loaded.policy(tokens, mask, loaded.encode_prompts(prompts)),
                           model.policy(tokens, mask, model.encode_prompts(prompts)))
    cfg = load_config(TrainConfig, None, [f"model={out}", f"out_dir={tmp_path / 'run'}", "steps=2",
                                          "rewards={colour_fraction: 1.0}", "prompts.fixed=['a red circle']",
                                          "algorithm.ptx_weight=0", "algorithm.prompts_per_step=1",
                                          "algorithm.group_size=2", "sampling.ar_steps=2",
                                          "sampling.diffusion_steps=4", "log.tensorboard=false"])
    rows = Trainer(cfg, progress=False).run()
    assert len(rows) == 2 and (tmp_path / "run" / "model" / "config.json").is_file()
    again = load_model(str(tmp_path / "run" / "model"), "cpu")
    assert type(again).__name__ == "HarmonImageModel"
    resumed = load_model(str(tmp_path / "run"), "cpu")  # the run directory: base folder + last checkpoint
    trained = dict(again.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in resumed.named_parameters())
    assert any(not torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in trained.items())


def test_bfloat16_weights_sample_with_float32_log_probs(files):
    from margrpo.sampling.config import RecordPlan, SamplerConfig
    from margrpo.sampling.sampler import sample

    m = harmon.load(files["pth"], llm=files["llm"], vae=files["vae"], dtype=torch.bfloat16, **LOAD_KW)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    cond = m.encode_prompts(["a cat", "a dog"])
    r = sample(m.policy, cond, 2, SamplerConfig(ar_steps=2, diffusion_steps=None, guidance_scale=2.0),
               torch.Generator().manual_seed(0), record=RecordPlan())
    assert r.tokens.dtype == torch.float32 and all(rec.logp.dtype == torch.float32 for rec in r.steps.values())
    assert torch.isfinite(r.tokens).all() and m.decode(r.tokens).shape == (2, 3, 16, 16)
