"""LTH14/mar checkpoint loading: upstream's on-disk format, architecture inference, clear errors."""

import argparse

import pytest
import torch

from margrpo.compat import lth14
from margrpo.models.mar import MARPolicy

from conftest import randomize, tiny_mar_kwargs

UPSTREAM_KW = dict(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=1,
                   decoder_embed_dim=64, decoder_depth=3, decoder_num_heads=1, vae_embed_dim=16, buffer_size=8,
                   diffloss_d=2, diffloss_w=48, class_num=1000, num_sampling_steps="10")


def upstream_args(**over) -> argparse.Namespace:
    """The Namespace that LTH14's main_mar.py stores under 'args' (a subset of its fields), from a fork that also
    records the head counts of its non-preset model (upstream's presets fix them; the weights cannot tell)."""
    a = dict(model="mar_tiny", encoder_num_heads=1, decoder_num_heads=1, img_size=64, vae_stride=16, patch_size=1,
             vae_embed_dim=16, mask_ratio_min=0.7,
             label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=8,
             diffloss_d=2, diffloss_w=48, num_sampling_steps="10", diffusion_batch_mul=4, grad_checkpointing=False,
             lr=None, blr=1e-4, output_dir="./output", cfg=1.0, temperature=1.0, seed=1)
    a.update(over)
    return argparse.Namespace(**a)


@pytest.fixture
def checkpoint(tmp_path):
    model = randomize(MARPolicy(**UPSTREAM_KW), seed=1)
    ema = randomize(MARPolicy(**UPSTREAM_KW), seed=2)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3,
                "args": upstream_args()}, path)
    return path, model, ema


def test_loads_upstream_checkpoint_with_namespace(checkpoint):
    path, model, ema = checkpoint
    loaded = lth14.load_checkpoint(path, ema=True)
    assert not loaded.training
    for k, v in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    raw = lth14.load_checkpoint(path, ema=False)
    assert torch.equal(raw.state_dict()["z_proj.weight"], model.state_dict()["z_proj.weight"])
    cfg = loaded.config
    assert (cfg.encoder_depth, cfg.decoder_depth, cfg.buffer_size, cfg.diffloss_w, cfg.diffloss_d) == (2, 3, 8, 48, 2)
    assert cfg.seq_len == 16 and cfg.token_dim == 16 and cfg.num_sampling_steps == "10"


def test_loaded_model_computes_what_the_original_does(checkpoint):
    path, _, ema = checkpoint
    loaded = lth14.load_checkpoint(path)
    ema.eval()
    tokens, mask = torch.randn(2, 16, 16), torch.zeros(2, 16)
    mask[:, :10] = 1
    labels = torch.tensor([3, 999])
    with torch.no_grad():
        assert torch.equal(loaded.compute_z(tokens, mask, labels), ema.compute_z(tokens, mask, labels))
        z = ema.compute_z(tokens, mask, None)
        t = torch.tensor([5] * 32)
        assert torch.equal(loaded.head.net(tokens.reshape(32, 16), t, z.reshape(32, -1)),
                           ema.head.net(tokens.reshape(32, 16), t, z.reshape(32, -1)))


def test_from_state_dict_with_upstream_kwargs():
    model = randomize(MARPolicy(**tiny_mar_kwargs(class_num=1000, clip_denoised=False)))
    kw = {k: v for k, v in tiny_mar_kwargs(class_num=1000).items() if k != "clip_denoised"}
    loaded = lth14.from_state_dict(model.state_dict(), **kw)
    assert loaded.config.encoder_num_heads == 4 and loaded.config.seq_len == 64
    with pytest.raises(TypeError, match="unknown MAR argument"):
        lth14.from_state_dict(model.state_dict(), encoder_width=3)


def test_mismatched_geometry_is_reported():
    model = MARPolicy(**UPSTREAM_KW)
    with pytest.raises(lth14.CheckpointError, match="tokens"):
        lth14.from_state_dict(model.state_dict(), img_size=128, encoder_num_heads=1, decoder_num_heads=1)


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    sd = MARPolicy(**UPSTREAM_KW).state_dict()
    sd.pop("decoder_norm.weight")
    sd["extra.thing"] = torch.zeros(1)
    sd["class_emb.weight"] = torch.zeros(1000, 64)
    sd["encoder_blocks.1.mlp.fc2.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save({"model_ema": sd, "args": upstream_args()}, path)
    with pytest.raises(lth14.CheckpointError) as e:
        lth14.load_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "decoder_norm.weight" in msg and "extra.thing" in msg
    assert "encoder_blocks.1.mlp.fc2.bias" in msg and "(5,)" in msg


def test_missing_ema_entry_is_explained(tmp_path):
    path = tmp_path / "no_ema.pth"
    torch.save({"model": MARPolicy(**UPSTREAM_KW).state_dict(), "args": upstream_args()}, path)
    with pytest.raises(lth14.CheckpointError, match="ema=False"):
        lth14.load_checkpoint(path)
    assert lth14.load_checkpoint(path, ema=False).config.decoder_depth == 3


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_refuses_arbitrary_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": MARPolicy(**UPSTREAM_KW).state_dict(), "args": Evil()}, path)
    with pytest.raises(Exception, match="refused|weights_only|Unsupported"):
        lth14.load_checkpoint(path, ema=False)


def test_preset_name_sets_heads():
    sd = MARPolicy(**{**UPSTREAM_KW, "encoder_embed_dim": 64, "decoder_embed_dim": 64}).state_dict()
    cfg = lth14.infer_config(sd, {"model": "mar_huge"})
    assert cfg.encoder_num_heads == 16


def test_head_counts_come_from_the_file_or_the_caller_never_a_guess(tmp_path):
    """A 64-wide model with 2 heads per block: the weights alone are the same for 1, 2 or 4 heads."""
    two = randomize(MARPolicy(**{**UPSTREAM_KW, "encoder_num_heads": 2, "decoder_num_heads": 2}), seed=3).eval()
    path = tmp_path / "two-heads.pth"
    torch.save({"model": two.state_dict(), "args": upstream_args(encoder_num_heads=2, decoder_num_heads=2)}, path)
    loaded = lth14.load_checkpoint(path, ema=False)
    assert (loaded.config.encoder_num_heads, loaded.config.decoder_num_heads) == (2, 2)
    tokens, mask = torch.randn(2, 16, 16), torch.zeros(2, 16)
    mask[:, :10] = 1
    with torch.no_grad():
        assert torch.equal(loaded.compute_z(tokens, mask, torch.tensor([1, 2])),
                           two.compute_z(tokens, mask, torch.tensor([1, 2])))
    bare = argparse.Namespace(**{k: v for k, v in vars(upstream_args()).items() if not k.endswith("num_heads")})
    torch.save({"model": two.state_dict(), "args": bare}, path)
    with pytest.raises(lth14.CheckpointError, match="does not say encoder_num_heads.*pass it"):
        lth14.load_checkpoint(path, ema=False)
    given = lth14.load_checkpoint(path, ema=False, encoder_num_heads=2, decoder_num_heads=2)
    assert given.config.encoder_num_heads == 2
    torch.save({"model": two.state_dict(), "args": upstream_args(encoder_depth=5)}, path)
    with pytest.raises(lth14.CheckpointError, match="encoder_depth=5 .the checkpoint's args. contradicts the weights"):
        lth14.load_checkpoint(path, ema=False)


def test_convert_writes_a_model_folder_that_training_can_name(tmp_path, capsys):
    """`margrpo convert lth14` turns upstream's two files into a folder that `model:` names: same z, decodable
    tokens, a training step on it; a latent MAR without its autoencoder is one clear error."""
    from margrpo.cli import main
    from margrpo.models.loading import load_model
    from margrpo.models.vae import AutoencoderKL
    from margrpo.rl.config import TrainConfig
    from margrpo.rl.trainer import Trainer
    from margrpo.utils.config import load_config

    kw = dict(UPSTREAM_KW, img_size=32, vae_stride=4, vae_embed_dim=4, class_num=10)
    mar = randomize(MARPolicy(**kw), seed=4)
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": mar.state_dict(), "model_ema": mar.state_dict(),
                "args": upstream_args(img_size=32, vae_stride=4, vae_embed_dim=4, class_num=10)}, ckpt)
    torch.manual_seed(0)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, resolution=32,
                        encoder_attn_resolutions=(8,), decoder_attn_resolutions=()).eval()  # 32 groups, as upstream
    torch.save({"model": vae.state_dict()}, tmp_path / "kl16.ckpt")

    # the autoencoder is required: a loader never guesses how tokens decode
    assert main(["convert", "lth14", str(ckpt), str(tmp_path / "nope")]) == 2
    assert "--vae" in capsys.readouterr().err and not (tmp_path / "nope").exists()
    torch.manual_seed(1)
    other = AutoencoderKL(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, resolution=32,
                          encoder_attn_resolutions=(), decoder_attn_resolutions=()).eval()  # stride 2, not 4
    torch.save({"model": other.state_dict()}, tmp_path / "stride2.ckpt")
    assert main(["convert", "lth14", str(ckpt), str(tmp_path / "bad"), "--vae", str(tmp_path / "stride2.ckpt")]) == 2
    assert "stride 2" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    args = ["convert", "lth14", str(ckpt), str(tmp_path / "folder"), "--vae", str(tmp_path / "kl16.ckpt")]
    assert main(args) == 0
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # an existing folder is not overwritten
    assert main([*args, "--force"]) == 0
    model = load_model(str(tmp_path / "folder"), "cpu")
    assert not model.training  # loaders return eval mode (dropout off)
    tokens, mask = torch.randn(2, 64, 4), torch.zeros(2, 64)
    mask[:, :30] = 1
    with torch.no_grad():
        z = model.policy(tokens, mask, model.encode_prompts([3, 7]))
        z_upstream = mar.eval()(tokens, mask, torch.tensor([3, 7]))
        assert torch.equal(z, z_upstream)
        assert model.decode(tokens).shape == (2, 3, 32, 32)
    cfg = load_config(TrainConfig, None, [f"model={tmp_path / 'folder'}", f"out_dir={tmp_path / 'run'}", "steps=1",
                                          "rewards={colour_fraction: 1.0}", "prompts.fixed=['3']",
                                          "algorithm.ptx_weight=0", "algorithm.prompts_per_step=1",
                                          "algorithm.group_size=2", "sampling.ar_steps=2",
                                          "sampling.diffusion_steps=4", "log.tensorboard=false"])
    rows = Trainer(cfg, progress=False).run()
    assert len(rows) == 1 and (tmp_path / "run" / "model" / "config.json").is_file()
