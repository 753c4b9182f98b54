"""Model-based rewards on tiny random models saved in each reward's on-disk format.

No weights can be downloaded here, so every loader is exercised on a tiny model written in the same
format as the real release: transformers ``save_pretrained`` directories (PickScore, CLIP), open_clip
state dicts (HPS v2 ``{"state_dict": ...}``, ``open_clip_pytorch_model.bin``), the aesthetic head's
``layers.N`` state dict and ImageReward's ``blip.*``/``mlp.*`` state dict + ``med_config.json``.

The open_clip conversion is checked against numbers recorded from the real open_clip (3.3.0, on
torch 2.14.1 + torchvision 0.29.1) for a tiny model whose weights are regenerated here from a seed;
where open_clip itself imports, the live tests at the end compare the two backends directly.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="model-based rewards need transformers")

from tiny_models import clip_tokenizer, openclip_state_dict, tiny_clip  # noqa: E402

from margrpo.rewards import build_reward  # noqa: E402
from margrpo.rewards._clip import ClipPreprocess, openclip_available, openclip_to_hf  # noqa: E402
from margrpo.rewards.aesthetic import AestheticMLP  # noqa: E402
from margrpo.rewards.imagereward import ImageRewardModel  # noqa: E402

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------
# Tiny open_clip model: tiny_oc.json = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2,
# "width": 40, "head_width": 20, "patch_size": 8}, "text_cfg": {"context_length": 16, "vocab_size": 64,
# "width": 64, "heads": 1, "layers": 2}}; weights = randn * 0.2 over sorted(state_dict) from seed 0,
# logit_scale = log(1/0.07). Features below were computed by open_clip 3.3.0's encode_image /
# encode_text(normalize=True) on the pixels / token ids built in _golden_inputs().
GOLD_IMG = [
    [-0.221136, 0.068579, 0.071366, -0.107262, -0.062015, 0.048706, -0.253317, -0.359644, -0.27708, 0.416865,
     0.014575, -0.48381, -0.245509, 0.310677, 0.223993, -0.195612],
    [-0.226818, 0.062634, 0.061793, -0.108803, -0.063467, 0.059055, -0.250503, -0.363052, -0.268526, 0.415463,
     0.010083, -0.481721, -0.250546, 0.313162, 0.226652, -0.194453],
]
GOLD_TXT = [
    [0.061162, -0.177803, -0.544571, -0.165645, 0.023206, -0.145604, 0.069353, -0.242326, 0.330322, -0.232401,
     0.166995, 0.092125, 0.192694, -0.333872, -0.190859, 0.413343],
    [0.073277, -0.147583, -0.579857, -0.190125, 0.05067, -0.16932, -0.028351, -0.210943, 0.325061, -0.203403,
     0.162091, 0.069433, 0.201548, -0.29022, -0.133024, 0.450837],
]
OC_VISION_HEAD_WIDTH = 20


def _golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[0, :5] = torch.tensor([62, 5, 9, 17, 63])
    ids[1, :3] = torch.tensor([62, 33, 63])
    return px, ids


def _images(sizes=((40, 30), (32, 32), (24, 56), (32, 32)), seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for w, h in sizes]


PROMPTS = ["a red circle", "two blue squares", "a red circle", "green triangle left of a star"]


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory) -> Path:
    """A CLIP BPE tokenizer with 64 ids (letters, letters</w>, digits, sot=62, eot=63) saved by transformers."""
    return clip_tokenizer(tmp_path_factory.mktemp("cliptok"))


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory, clip_tok) -> Path:
    """A tiny transformers CLIP directory (model + tokenizer + preprocessor_config.json)."""
    return tiny_clip(tmp_path_factory.mktemp("hfclip"), clip_tok)


@pytest.fixture(scope="module")
def hps_ckpt(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": openclip_state_dict()}, p)
    return p


def _check_scores(out, n: int) -> None:
    assert out.scores.shape == (n,) and out.scores.dtype == torch.float32
    assert bool(out.valid.all()) and bool(torch.isfinite(out.scores).all()), out.reasons


# ------------------------------------------------------------------------------------------------ open_clip format
def test_openclip_conversion_matches_recorded_open_clip_features():
    cfg, hf_sd = openclip_to_hf(openclip_state_dict(), vision_head_width=OC_VISION_HEAD_WIDTH)
    cfg.text_config.eos_token_id = 63
    model = transformers.CLIPModel(cfg).eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected
    px, ids = _golden_inputs()
    with torch.no_grad():
        fi = model.get_image_features(pixel_values=px)
        ft = model.get_text_features(input_ids=ids)
    fi = F.normalize(getattr(fi, "pooler_output", fi), dim=-1)
    ft = F.normalize(getattr(ft, "pooler_output", ft), dim=-1)
    torch.testing.assert_close(fi, torch.tensor(GOLD_IMG), atol=2e-5, rtol=0)
    torch.testing.assert_close(ft, torch.tensor(GOLD_TXT), atol=2e-5, rtol=0)


def test_openclip_converter_refuses_nonstandard_state_dicts():
    sd = openclip_state_dict()
    with pytest.raises(ValueError, match="does not support.*visual.attn_pool.q"):
        openclip_to_hf({**sd, "visual.attn_pool.q": torch.zeros(1)}, vision_head_width=OC_VISION_HEAD_WIDTH)
    del sd["visual.proj"]
    with pytest.raises(ValueError, match=r"missing keys \['visual.proj'\]"):
        openclip_to_hf(sd)


def test_hpsv2_end_to_end_on_hps_checkpoint_format(hps_ckpt, clip_tok):
    r = build_reward("hpsv2", checkpoint=hps_ckpt, tokenizer_path=clip_tok, backend="transformers",
                     vision_head_width=OC_VISION_HEAD_WIDTH, batch_size=4)
    imgs = _images()
    out = r(imgs, PROMPTS)
    _check_scores(out, 4)
    assert (out.scores.abs() <= 1.0 + 1e-5).all()  # dot product of unit vectors, no logit scale
    assert r.describe()["backend"] == "hf"
    one = build_reward("hpsv2", checkpoint=hps_ckpt, tokenizer_path=clip_tok, backend="transformers",
                       vision_head_width=OC_VISION_HEAD_WIDTH, batch_size=1)(imgs, PROMPTS)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=0)  # batched == unbatched
    # by hand: HPS transform (long side to 32, zero pad), converted model, unit features, dot product
    enc = r.encoder
    x = ClipPreprocess(32, mode="longest_pad")([imgs[2]])
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        fi = enc.model.get_image_features(pixel_values=x)
    fi = F.normalize(getattr(fi, "pooler_output", fi), dim=-1)  # transformers 5 wraps, 4.x does not
    ft = enc.text_features([PROMPTS[2]])
    assert float((fi * ft).sum()) == pytest.approx(float(out.scores[2]), abs=1e-5)


def test_openclip_backends_fail_clearly(hps_ckpt, tmp_path):
    if not openclip_available():
        with pytest.raises(ValueError, match="needs tokenizer_path"):
            build_reward("hpsv2", checkpoint=hps_ckpt, vision_head_width=OC_VISION_HEAD_WIDTH)
    with pytest.raises(FileNotFoundError, match="hpsv2 checkpoint file not found: .*nope.pt"):
        build_reward("hpsv2", checkpoint=tmp_path / "nope.pt", tokenizer_path=tmp_path)
    with pytest.raises(ValueError, match="backend must be"):
        build_reward("hpsv2", checkpoint=hps_ckpt, backend="jax")


def test_clip_score_from_open_clip_bin_and_from_hf_dir(tmp_path, clip_tok, hf_clip_dir):
    bin_path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(openclip_state_dict(), bin_path)
    kw = dict(checkpoint=bin_path, tokenizer_path=clip_tok, backend="transformers",
              vision_head_width=OC_VISION_HEAD_WIDTH)
    imgs = _images()
    base = build_reward("clip_score", **kw)(imgs, PROMPTS)
    _check_scores(base, 4)
    scaled = build_reward("clip_score", scale=100.0, **kw)(imgs, PROMPTS)
    torch.testing.assert_close(scaled.scores, 100 * base.scores, atol=1e-4, rtol=1e-5)
    hf = build_reward("clip_score", model_path=hf_clip_dir)
    out = hf(imgs, PROMPTS)
    _check_scores(out, 4)
    assert (out.scores.abs() <= 1.0 + 1e-5).all()
    with pytest.raises(ValueError, match="exactly one of model_path"):
        build_reward("clip_score", model_path=hf_clip_dir, checkpoint=bin_path)


def test_clip_score_dtype_is_a_parameter(hf_clip_dir):
    imgs = _images()
    f32 = build_reward("clip_score", model_path=hf_clip_dir)(imgs, PROMPTS)
    bf16 = build_reward("clip_score", model_path=hf_clip_dir, dtype="bfloat16")
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    out = bf16(imgs, PROMPTS)
    assert out.scores.dtype == torch.float32
    torch.testing.assert_close(out.scores, f32.scores, atol=0.05, rtol=0)


def test_pickscore_matches_transformers_reference_pipeline(tmp_path, hf_clip_dir):
    # model and processor in separate directories, as PickScore_v1 + the CLIP-H processor are released
    proc_dir = tmp_path / "processor"
    proc_dir.mkdir()
    for f in hf_clip_dir.iterdir():
        if f.name.startswith(("tokenizer", "preprocessor", "special_tokens", "vocab", "merges")):
            (proc_dir / f.name).write_bytes(f.read_bytes())
    r = build_reward("pickscore", model_path=hf_clip_dir, processor_path=proc_dir, batch_size=3)
    imgs = _images(((32, 32),) * 4)  # no resize/crop: pixels are the processor-independent part
    out = r(imgs, PROMPTS)
    _check_scores(out, 4)
    model = transformers.CLIPModel.from_pretrained(str(hf_clip_dir), local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    px = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs]) / 255.0
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=(px - mean) / std)
        te = model.get_text_features(**tok(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt"))
    ie, te = (F.normalize(getattr(t, "pooler_output", t), dim=-1) for t in (ie, te))
    ref = model.logit_scale.exp() * (ie * te).sum(-1)  # PickScore README: logit_scale.exp() * cos
    torch.testing.assert_close(out.scores, ref, atol=1e-4, rtol=1e-5)


def test_aesthetic_head_on_clip_image_embedding(tmp_path, hf_clip_dir):
    torch.manual_seed(3)
    head = AestheticMLP(16)
    ckpt = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), ckpt)
    assert sorted({k.split(".")[1] for k in head.state_dict()}) == ["0", "2", "4", "6", "7"]
    r = build_reward("aesthetic", checkpoint=ckpt, clip_model_path=hf_clip_dir)
    imgs = _images()
    out = r(imgs, PROMPTS)
    _check_scores(out, 4)
    other = r(imgs, ["", "", "", ""])  # the prompt plays no part
    torch.testing.assert_close(other.scores, out.scores)
    with torch.no_grad():
        ref = head.eval()(r.encoder.image_features(imgs)).reshape(-1)
    torch.testing.assert_close(out.scores, ref, atol=1e-5, rtol=0)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, bad)
    with pytest.raises(ValueError, match="no 'layers.0.weight'"):
        build_reward("aesthetic", checkpoint=bad, clip_model_path=hf_clip_dir)


# ------------------------------------------------------------------------------------------------ ImageReward
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
              "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert",
              "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": 40, "encoder_width": 768, "add_cross_attention": True}


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagereward")
    (d / "med_config.json").write_text(json.dumps(MED_CONFIG))
    raw = d / "raw"
    raw.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, "red", "circle", "blue"]
    (raw / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer.from_pretrained(str(raw), local_files_only=True).save_pretrained(d / "bert")
    torch.manual_seed(0)
    model = ImageRewardModel(MED_CONFIG, image_size=32, patch_size=8, vision_width=64, vision_depth=2,
                             vision_heads=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = dict(model.state_dict())
    # the release also carries BLIP's contrastive projections; the loader must tolerate them
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = torch.zeros(8, 64), torch.zeros(8)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = torch.zeros(8, 32), torch.zeros(8)
    torch.save(sd, d / "ImageReward.pt")
    return d, model.eval()


def test_imagereward_end_to_end(imagereward_files):
    d, model = imagereward_files
    kw = dict(checkpoint=d / "ImageReward.pt", med_config=d / "med_config.json", tokenizer_path=d / "bert",
              max_length=12)
    r = build_reward("imagereward", batch_size=4, **kw)
    imgs = _images()
    out = r(imgs, PROMPTS)
    _check_scores(out, 4)
    one = build_reward("imagereward", batch_size=1, **kw)(imgs, PROMPTS)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=0)  # padding masks hold
    tok = r.tokenizer
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [34, 35]  # BLIP appends both after the vocab
    enc = tok(PROMPTS[:1], padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        ref = model(ClipPreprocess(32)([imgs[0]]), enc["input_ids"], enc["attention_mask"])
    assert float(ref[0]) == pytest.approx(float(out.scores[0]), abs=1e-5)


def test_imagereward_rejects_wrong_layout(imagereward_files, tmp_path):
    d, _ = imagereward_files
    bad = tmp_path / "bad.pt"
    sd = torch.load(d / "ImageReward.pt", weights_only=True)
    sd.pop("mlp.layers.7.bias")
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing \['mlp.layers.7.bias'\]"):
        build_reward("imagereward", checkpoint=bad, med_config=d / "med_config.json", tokenizer_path=d / "bert")
    with pytest.raises(FileNotFoundError, match="neither vocab.txt nor tokenizer.json"):
        build_reward("imagereward", checkpoint=d / "ImageReward.pt", med_config=d / "med_config.json",
                     tokenizer_path=tmp_path)


# ------------------------------------------------------------------------------------------------ live open_clip
def _require_open_clip():
    if not openclip_available():
        pytest.skip("open_clip does not import here (it needs a torchvision that loads beside this torch)")
    import open_clip

    return open_clip


def test_live_open_clip_backend_equals_transformers_backend(tmp_path):
    """Real open_clip vs the conversion, at the reward level, with open_clip's own tokenizer vocabulary."""
    open_clip = _require_open_clip()
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 40, "head_width": 20,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2}}
    (tmp_path / "tiny_live.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "tiny_live.json"))
    model = open_clip.create_model("tiny_live", pretrained=None)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}}, ckpt)
    # a transformers CLIP tokenizer with exactly open_clip's BPE vocabulary and merges
    sot = open_clip.get_tokenizer("tiny_live")
    raw, tok_dir = tmp_path / "raw", tmp_path / "tok"
    raw.mkdir()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # HF spelling, same ids
    (raw / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in sot.encoder.items()}))
    merges = sorted(sot.bpe_ranks.items(), key=lambda kv: kv[1])
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    transformers.CLIPTokenizer.from_pretrained(str(raw), local_files_only=True).save_pretrained(tok_dir)
    imgs = _images()
    kw = dict(checkpoint=ckpt, arch="tiny_live", tokenizer_path=tok_dir, vision_head_width=20)
    a = build_reward("hpsv2", backend="open_clip", **kw)(imgs, PROMPTS)
    b = build_reward("hpsv2", backend="transformers", **kw)(imgs, PROMPTS)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-5, rtol=0)


def test_live_preprocessing_matches_torchvision_transforms():
    open_clip = _require_open_clip()
    import torchvision.transforms.functional as TF
    from open_clip.transform import image_transform

    imgs = _images(((40, 30), (24, 56), (33, 50)))
    ref = image_transform(32, is_train=False)  # open_clip eval: Resize(32, bicubic) + CenterCrop + normalize
    torch.testing.assert_close(ClipPreprocess(32)(imgs), torch.stack([ref(im) for im in imgs]), atol=1e-6, rtol=0)
    for im in imgs:  # HPS v2 ResizeMaxSize on a tensor, as in hpsv2/src/open_clip/transform.py
        x = TF.to_tensor(im)
        h, w = x.shape[1:]
        scale = 32 / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = TF.resize(x, [nh, nw], TF.InterpolationMode.BICUBIC)
        ph, pw = 32 - nh, 32 - nw
        x = TF.pad(x, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        x = TF.normalize(x, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        torch.testing.assert_close(ClipPreprocess(32, mode="longest_pad")([im])[0], x, atol=1e-5, rtol=0)
