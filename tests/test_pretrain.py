"""Pretraining end to end on tiny models: the autoencoder stage, persistence of latent-token generators,
seeded reproducibility, resume, and config validation."""

import json
import shutil

import pytest
import torch

from margrpo.models.codecs import AutoencoderCodec
from margrpo.models.mar.factory import ModelSpec, build_model
from margrpo.models.mar.image_model import MARImageModel
from margrpo.worlds.shapes.pretrain import EvalSpec, PretrainConfig, pretrain, vocabulary
from margrpo.worlds.shapes.pretrain_autoencoder import AutoencoderSpec, train_autoencoder

TINY_MODEL = ModelSpec(codec="autoencoder", patch_size=1, width=32, depth=1, num_heads=2, head_width=32,
                       head_depth=1, diffusion_steps=4, text_dim=16, clip_denoised=False)
TINY_AE = AutoencoderSpec(embed_dim=4, ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, num_groups=4, steps=3,
                          batch_size=8, scale_images=16)
WEIGHTS = {"single": 1.0, "colour_attr": 1.0, "counting": 1.0, "position": 1.0}


def _cfg(out, steps=2, **kw) -> PretrainConfig:
    return PretrainConfig(model=TINY_MODEL, autoencoder=TINY_AE, eval=EvalSpec(per_category=1, ar_steps=2),
                          out_dir=str(out), steps=steps, batch_size=4, warmup_steps=1, eval_every=2,
                          checkpoint_every=1, data_workers=0, threads=0, **kw)


def _sample(model: MARImageModel) -> torch.Tensor:
    from margrpo.sampling.config import SamplerConfig
    from margrpo.sampling.sampler import sample

    cond = model.encode_prompts(["a red circle", "two blue squares"])
    r = sample(model.policy, cond, 2, SamplerConfig(ar_steps=2, diffusion_steps=3),
               torch.Generator().manual_seed(3))
    return model.decode(r.tokens)


def test_autoencoder_stage_writes_scale_and_is_reused(tmp_path):
    tok = train_autoencoder(TINY_AE, img_size=32, seed=0, out_dir=tmp_path, category_weights=WEIGHTS, progress=False)
    meta = json.loads((tmp_path / "autoencoder" / "autoencoder.json").read_text())
    assert tok.stride == 8 and tok.latent_channels == 4
    assert meta["scale"] == pytest.approx(tok.scale) and 0 < tok.scale < float("inf")
    assert set(meta["reconstruction_verifier"]) >= {"overall"}
    stamp = (tmp_path / "autoencoder" / "autoencoder.safetensors").stat().st_mtime_ns
    again = train_autoencoder(TINY_AE, img_size=32, seed=0, out_dir=tmp_path, category_weights=WEIGHTS,
                              progress=False)
    assert (tmp_path / "autoencoder" / "autoencoder.safetensors").stat().st_mtime_ns == stamp
    for a, b in zip(tok.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A different spec is a different autoencoder: retrained, not silently reused.
    other = train_autoencoder(AutoencoderSpec(**{**TINY_AE.__dict__, "steps": 4}), img_size=32, seed=0,
                              out_dir=tmp_path, category_weights=WEIGHTS, progress=False)
    assert json.loads((tmp_path / "autoencoder" / "autoencoder.json").read_text())["spec"]["steps"] == 4
    assert not torch.equal(other.vae.decoder.conv_out.weight, tok.vae.decoder.conv_out.weight)


def test_latent_token_pretrain_is_reproducible_exports_and_resumes(tmp_path):
    model_a = pretrain(_cfg(tmp_path / "a"), progress=False)
    model_b = pretrain(_cfg(tmp_path / "b"), progress=False)
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"same seed, different weights at {k}"
    loaded = MARImageModel.load_pretrained(tmp_path / "a" / "model")
    assert isinstance(loaded.codec, AutoencoderCodec)
    assert loaded.mar.config.vae_stride == 8 and loaded.mar.config.vae_embed_dim == 4
    assert loaded.codec.scale == pytest.approx(model_a.codec.scale)
    images = _sample(loaded)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1.0
    assert torch.equal(images, _sample(model_a.eval()))

    # A crash after step 2 of a 4-step run, then --resume (reusing the autoencoder) == no crash.
    straight = pretrain(_cfg(tmp_path / "c", steps=4, keep_checkpoints=10), progress=False)
    shutil.copytree(tmp_path / "c", tmp_path / "d")
    for name in ("step-3", "step-4", "latest"):
        p = tmp_path / "d" / "checkpoints" / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    shutil.rmtree(tmp_path / "d" / "model")
    resumed = pretrain(_cfg(tmp_path / "d", steps=4, keep_checkpoints=10), resume=True, progress=False)
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"resumed run differs at {k}: max diff {(a - b).abs().max()}"


def test_generator_folder_rejects_a_broken_tokenizer_spec(tmp_path):
    tok = AutoencoderCodec(TINY_AE.build(32), scale=0.5)
    build_model(TINY_MODEL, vocabulary(), tok).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tokenizer"]["type"] == "autoencoder_kl" and cfg["tokenizer"]["scale"] == 0.5
    del cfg["tokenizer"]["scale"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer.*scale"):
        MARImageModel.load_pretrained(tmp_path)
    cfg["tokenizer"] = {"type": "vqgan"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'vqgan'.*valid: 'pixels', 'autoencoder_kl'"):
        MARImageModel.load_pretrained(tmp_path)


def test_config_errors_name_the_problem():
    from margrpo.utils.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'model.tokenizer'; it was renamed to 'model.codec'"):
        load_config(PretrainConfig, None, ["model.tokenizer=autoencoder"])
    with pytest.raises(ValueError, match="'autoencoder' section is required"):
        PretrainConfig(model=TINY_MODEL)
    with pytest.raises(ValueError, match="would do nothing"):
        PretrainConfig(autoencoder=TINY_AE)
    with pytest.raises(ValueError, match="num_groups=8 must divide"):
        AutoencoderSpec(ch=12, num_groups=8)
    with pytest.raises(ValueError, match="needs an autoencoder codec"):
        build_model(TINY_MODEL, vocabulary())
    with pytest.raises(ValueError, match="not a multiple"):
        build_model(ModelSpec(**{**TINY_MODEL.__dict__, "img_size": 36}), vocabulary(),
                        AutoencoderCodec(TINY_AE.build(32), scale=1.0))


def test_lr_cycles_restart_and_extend_a_shorter_run_exactly():
    import math

    from margrpo.worlds.shapes.pretrain import lr_at

    short = PretrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    long = PretrainConfig(steps=300, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, lr_cycle_steps=100)
    assert [lr_at(s, short) for s in range(100)] == [lr_at(s, long) for s in range(100)]
    assert lr_at(0, short) == pytest.approx(1e-4)  # warm-up 1/10
    assert lr_at(10, short) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(55, short) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(100, long) == lr_at(0, long) and lr_at(255, long) == lr_at(55, long)  # each cycle re-warms
