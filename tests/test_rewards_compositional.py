"""The compositional rewards (grounding_dino, git_vqa, geneval) on tiny random models in their published layout.

Each model folder is written by the real transformers classes' ``save_pretrained`` (``tiny_models``) and read by
the reward from that folder only. Scores are checked against the same quantities computed by hand from the raw
model outputs (token spans chosen by hand, softmax read by hand, the rules applied to hand-decoded detections),
batched against one by one, under another dtype, and through the reward server.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="model-based rewards need transformers")

from tiny_models import (  # noqa: E402
    BERT_WORDS,
    clip_tokenizer,
    openclip_state_dict,
    tiny_clip,
    tiny_git,
    tiny_grounding_dino,
    tiny_hpsv3,
    tiny_owlv2,
)

from margrpo.rewards import build_reward, build_rewards  # noqa: E402
from margrpo.rewards.geneval_rules import DetectedObject, evaluate, keep_objects  # noqa: E402
from margrpo.rewards.t2i_r1_rules import score_record  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gdino_dir(tmp_path_factory) -> Path:
    return tiny_grounding_dino(tmp_path_factory.mktemp("gdino"))


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory) -> Path:
    return tiny_git(tmp_path_factory.mktemp("git"))


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory) -> Path:
    pytest.importorskip("scipy", reason="transformers' OWLv2 image processor needs scipy without torchvision")
    return tiny_owlv2(tmp_path_factory.mktemp("owlv2"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    return tiny_clip(d / "model", clip_tokenizer(d))


def _images(n: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


T2I_R1 = [
    {"task_type": "spatial", "nouns": ["car", "zebra"],
     "spatial_info": {"obj1": "car", "obj2": "zebra", "locality": "below"}},
    {"task_type": "numeracy", "nouns": ["cat"], "numeracy_info": [{"obj_name": "cat", "num": 2}]},
    {"task_type": "color", "nouns": ["elephant", "teddy bear"], "attr_nouns": ["purple elephant", "blue teddy bear"]},
    {"task_type": "object", "nouns": ["dog", "red car", "bus"]},
    {"task_type": "non", "nouns": []},
]
T2I_PROMPTS = ["a car below a zebra", "two cats", "a purple elephant and a blue teddy bear",
               "a dog, a red car and a bus", "a sunset"]


# ------------------------------------------------------------------------------------------------ grounding_dino
def test_grounding_dino_phrase_probabilities_are_span_means_of_token_sigmoids(gdino_dir):
    r = build_reward("grounding_dino", model_path=gdino_dir)
    det = r.detector
    img = _images(1)[0]
    # "red car . zebra." -> [CLS] red car . zebra . [SEP]: "red car" is tokens 1-2, "zebra" token 4
    (boxes, probs), = det.class_probs([img], [["red car", "zebra"]])
    enc = det.processor(images=[img], text=["red car . zebra."], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == [BERT_WORDS.index(w) for w in
                                            ("[CLS]", "red", "car", ".", "zebra", ".", "[SEP]")]
    with torch.no_grad():
        out = det.model(**enc)
    sig = out.logits[0].sigmoid()
    torch.testing.assert_close(probs[:, 0], (sig[:, 1] + sig[:, 2]) / 2)
    torch.testing.assert_close(probs[:, 1], sig[:, 4])
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    torch.testing.assert_close(boxes, torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1))


def test_grounding_dino_reward_is_the_t2i_r1_rules_on_its_phrase_detections(gdino_dir):
    r = build_reward("grounding_dino", model_path=gdino_dir, batch_size=8)
    images = _images(len(T2I_R1))
    out = r(images, T2I_PROMPTS, T2I_R1)
    assert bool(out.valid.all()), out.reasons
    assert out.categories == ["spatial", "numeracy", "color", "object", "non"]
    # by hand: boxes of each noun above 0.3, then the rules
    for i, meta in enumerate(T2I_R1):
        if not meta["nouns"]:
            assert float(out.scores[i]) == 1.0
            continue
        (boxes, probs), = r.detector.class_probs([images[i]], [meta["nouns"]])
        found = [[DetectedObject(n, tuple(boxes[q].tolist()), float(probs[q, j]))
                  for q in range(len(boxes)) if probs[q, j] > 0.3] for j, n in enumerate(meta["nouns"])]
        assert float(out.scores[i]) == pytest.approx(score_record(found, meta), abs=1e-6)
    one = build_reward("grounding_dino", model_path=gdino_dir, batch_size=1)(images, T2I_PROMPTS, T2I_R1)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=0)  # batched == one by one


def test_grounding_dino_threshold_dtype_and_missing_metadata(gdino_dir):
    images = _images(2, seed=1)
    meta = [T2I_R1[3], T2I_R1[3]]
    # with threshold 0 every noun is found on some box: the object score is 1
    assert build_reward("grounding_dino", model_path=gdino_dir, box_threshold=0.0)(images, ["p", "p"], meta
                                                                                    ).scores.tolist() == [1.0, 1.0]
    bf = build_reward("grounding_dino", model_path=gdino_dir, dtype="bfloat16")
    assert next(bf.detector.model.parameters()).dtype == torch.bfloat16
    out = bf(images, ["p", "p"], meta)
    assert bool(out.valid.all()) and bool(((out.scores >= 0) & (out.scores <= 1)).all())
    bad = bf(images, ["p", "p"], [{"category": "text"}, meta[0]])
    assert not bool(bad.valid.any()) and "has no T2I-R1 metadata" in bad.reasons[0]
    with pytest.raises(FileNotFoundError, match="not a transformers model folder"):
        build_reward("grounding_dino", model_path=gdino_dir / "nope")


# ------------------------------------------------------------------------------------------------ git_vqa
def test_git_vqa_is_the_yes_share_of_yes_and_no_at_the_last_question_token(git_dir):
    r = build_reward("git_vqa", model_path=git_dir)
    images = _images(len(T2I_R1), size=(40, 32))
    out = r(images, T2I_PROMPTS, T2I_R1)
    assert bool(out.valid.all()), out.reasons
    assert out.scores[0] == 0.0 and out.scores[1] == 0.0  # spatial and numeracy: 0, as the release
    assert out.scores[4] == 1.0  # no phrase at all
    tok, model = r.processor.tokenizer, r.model
    yes, no = BERT_WORDS.index("yes"), BERT_WORDS.index("no")

    def by_hand(image, question):
        ids = [BERT_WORDS.index("[CLS]")] + [BERT_WORDS.index(w) for w in question.replace("?", " ?").split()]
        assert ids[1:] == tok(question, add_special_tokens=False).input_ids
        px = r.processor(images=image, return_tensors="pt").pixel_values
        with torch.no_grad():
            p = model(pixel_values=px, input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)
        return float(p[yes] / (p[yes] + p[no]))

    # attr_nouns when the record has them, else nouns; the mean over questions
    want2 = (by_hand(images[2], "purple elephant?") + by_hand(images[2], "blue teddy bear?")) / 2
    want3 = np.mean([by_hand(images[3], q) for q in ("dog?", "red car?", "bus?")])
    assert float(out.scores[2]) == pytest.approx(want2, abs=1e-5)
    assert float(out.scores[3]) == pytest.approx(want3, abs=1e-5)
    one = build_reward("git_vqa", model_path=git_dir, batch_size=1)(images, T2I_PROMPTS, T2I_R1)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=0)


def test_git_vqa_template_dtype_and_errors(git_dir):
    images = _images(2, size=(32, 32))
    meta = [T2I_R1[2], T2I_R1[3]]
    base = build_reward("git_vqa", model_path=git_dir)(images, ["a", "b"], meta)
    other = build_reward("git_vqa", model_path=git_dir, question="is there a {phrase}?")(images, ["a", "b"], meta)
    assert bool(other.valid.all()) and not torch.equal(base.scores, other.scores)
    bf = build_reward("git_vqa", model_path=git_dir, dtype="bfloat16")
    assert bf.model.dtype == torch.bfloat16
    out = bf(images, ["a", "b"], meta)
    assert bool(out.valid.all()) and bool(((out.scores > 0) & (out.scores < 1)).all())
    with pytest.raises(ValueError, match="must contain '{phrase}'"):
        build_reward("git_vqa", model_path=git_dir, question="is it?")
    bad = bf(images, ["a", "b"], [{"tag": "colors", "include": []}, meta[0]])
    assert not bool(bad.valid.any()) and "nouns" in bad.reasons[0]


# ------------------------------------------------------------------------------------------------ geneval
GENEVAL = [
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                      {"class": "cup", "count": 1, "color": "red"}]},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
    {"tag": "position", "include": [{"class": "car", "count": 1}, {"class": "dog", "count": 1,
                                                                   "position": ["left of", 0]}]},
    {"tag": "single_object", "include": [{"class": "apple", "count": 1}]},
]


def _by_hand(reward, images, meta):
    """Detector -> keep -> CLIP colour of the objects read (templates averaged by hand) -> rules."""
    from margrpo.rewards.geneval_rules import COLOURS, colour_requests

    results = []
    for im, m in zip(images, meta, strict=True):
        classes = list(dict.fromkeys(it["class"] for k in ("include", "exclude") for it in m.get(k, [])))
        kept = keep_objects(reward.detector.detect([im], [classes], 0.0)[0], m["tag"], reward.rules)
        enc = reward.colours.encoder
        for cls, k in colour_requests(kept, m):
            o = kept[cls][k]
            x0, y0, x1, y1 = (round(v) for v in o.box)
            x0, y0 = min(max(x0, 0), im.width - 1), min(max(y0, 0), im.height - 1)
            f = enc.image_features([im.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))])[0]
            w = torch.stack([torch.nn.functional.normalize(enc.text_features(
                [f"a photo of a {c} {cls}", f"a photo of a {c}-colored {cls}", f"a photo of a {c} object"]).mean(0),
                dim=-1) for c in COLOURS])
            kept[cls][k] = DetectedObject(o.label, o.box, o.score, COLOURS[int((w @ f).argmax())])
        results.append(evaluate(kept, m, reward.rules))
    return results


@pytest.mark.parametrize("detector", ["grounding_dino", "owlv2"])
def test_geneval_reward_is_the_rules_on_the_detector_with_clip_colours(detector, request, clip_dir):
    model = request.getfixturevalue("gdino_dir" if detector == "grounding_dino" else "owl_dir")
    # threshold 0.05 so that the random detector finds objects and every rule path runs
    r = build_reward("geneval", detector=detector, model_path=model, clip_model_path=clip_dir, threshold=0.05,
                     counting_threshold=0.05, batch_size=4)
    images = _images(len(GENEVAL), size=(64, 48))
    out = r(images, ["p"] * len(GENEVAL), GENEVAL)
    assert bool(out.valid.all()), out.reasons
    assert out.categories == [m["tag"] for m in GENEVAL]
    want = _by_hand(r, images, GENEVAL)
    assert out.components["partial"].tolist() == pytest.approx([w.score for w in want], abs=1e-6)
    assert out.components["correct"].tolist() == [float(w.correct) for w in want]
    assert out.components["exact"].tolist() == [float(w.exact) for w in want]
    torch.testing.assert_close(out.scores, out.components["partial"])
    one = build_reward("geneval", detector=detector, model_path=model, clip_model_path=clip_dir, threshold=0.05,
                       counting_threshold=0.05, batch_size=1)(images, ["p"] * len(GENEVAL), GENEVAL)
    torch.testing.assert_close(one.components["partial"], out.components["partial"], atol=1e-6, rtol=0)


def test_owlv2_boxes_are_rescaled_from_its_padded_square(owl_dir):
    from margrpo.rewards.detectors import Owlv2

    det = Owlv2(owl_dir)
    wide = _images(1, size=(64, 32))[0]
    (boxes, probs), = det.class_probs([wide], [["cat", "dog"]])
    enc = det.processor(images=[wide], text=[["cat", "dog"]], return_tensors="pt")
    with torch.no_grad():
        out = det.model(**enc)
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)
    # the 64 x 32 image is padded to 64 x 64: x fractions stay, y fractions double
    torch.testing.assert_close(boxes, torch.stack([cx - w / 2, 2 * (cy - h / 2), cx + w / 2, 2 * (cy + h / 2)], -1))
    torch.testing.assert_close(probs, out.logits[0].sigmoid())


def test_geneval_modes_dtype_and_errors(gdino_dir, clip_dir):
    images = _images(2, size=(64, 64))
    kw = dict(detector="grounding_dino", model_path=gdino_dir, clip_model_path=clip_dir, threshold=0.05)
    exact = build_reward("geneval", mode="exact", **kw)(images, ["a", "b"], GENEVAL[:2])
    torch.testing.assert_close(exact.scores, exact.components["exact"])
    bf = build_reward("geneval", dtype="bfloat16", **kw)
    out = bf(images, ["a", "b"], GENEVAL[:2])
    assert bool(out.valid.all()) and bool(torch.isfinite(out.scores).all())
    bad = bf(images, ["a", "b"], [{"task_type": "color", "nouns": ["a"]}, GENEVAL[0]])
    assert not bool(bad.valid.any()) and "has no GenEval metadata" in bad.reasons[0]
    with pytest.raises(ValueError, match="does not see colours; set clip_model_path"):
        build_reward("geneval", detector="grounding_dino", model_path=gdino_dir)
    with pytest.raises(ValueError, match="detector must be one of"):
        build_reward("geneval", detector="mask2former", model_path=gdino_dir, clip_model_path=clip_dir)
    with pytest.raises(ValueError, match="needs model_path"):
        build_reward("geneval", detector="owlv2", clip_model_path=clip_dir)


def test_geneval_with_the_shapes_detector_needs_no_model():
    from margrpo.worlds.shapes import parse_prompt, render_scene
    from margrpo.worlds.shapes.geneval_bridge import geneval_metadata

    prompts = ["a red circle left of a blue square", "three green triangles"]
    images = [render_scene(p, np.random.default_rng(1)) for p in prompts]
    out = build_reward("geneval", detector="shapes", mode="correct")(
        images, prompts, [geneval_metadata(parse_prompt(p), p) for p in prompts])
    assert out.scores.tolist() == [1.0, 1.0] and out.categories == ["position", "counting"]


# ------------------------------------------------------------------------------------------------ serving, mixing
def test_the_compositional_rewards_serve_remotely_with_their_metadata(tmp_path, gdino_dir, git_dir):
    from margrpo.rewards.cli import _load_spec
    from margrpo.rewards.remote import RemoteReward, RewardServer

    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"rewards:\n  gdino: {{type: grounding_dino, model_path: {gdino_dir}}}\n"
                   f"  git: {{type: git_vqa, model_path: {git_dir}}}\n")
    spec, options = _load_spec(cfg)  # what `margrpo serve-reward --config` reads
    parts = {label: reward for label, _w, reward in build_rewards(spec, options).parts}
    srv = RewardServer(parts, port=0).start()
    try:
        images = _images(len(T2I_R1), seed=3)
        for label in ("gdino", "git"):
            remote = RemoteReward(url=srv.url, reward=label)(images, T2I_PROMPTS, T2I_R1)
            local = parts[label](images, T2I_PROMPTS, T2I_R1)
            assert torch.equal(remote.scores, local.scores) and remote.categories == local.categories
    finally:
        srv.shutdown()


def test_the_nova_mix_config_builds_hps_git_and_gdino_with_weight_one_each(tmp_path, gdino_dir, git_dir):
    """The shipped config's reward section, with its path placeholders pointed at tiny models."""
    import math

    import yaml

    from margrpo.configs import CONFIGS

    raw = yaml.safe_load((CONFIGS / "nova-mix.yaml").read_text())
    assert raw["rewards"] == {"hpsv2": 1.0, "git_vqa": 1.0, "grounding_dino": 1.0}
    hps = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": openclip_state_dict()}, hps)
    opts = raw["reward_options"]
    opts["hpsv2"].update(checkpoint=str(hps), tokenizer_path=str(clip_tokenizer(tmp_path / "ctok")),
                         backend="transformers", vision_head_width=20)
    opts["git_vqa"]["model_path"] = str(git_dir)
    opts["grounding_dino"]["model_path"] = str(gdino_dir)
    mix = build_rewards(raw["rewards"], opts)
    images = _images(len(T2I_R1), seed=4)
    out = mix(images, T2I_PROMPTS, T2I_R1)
    assert bool(out.valid.all()), out.reasons
    parts = [out.components[k] for k in ("hpsv2", "git_vqa", "grounding_dino")]
    torch.testing.assert_close(out.scores, parts[0] + parts[1] + parts[2])
    assert math.isclose(float(out.components["git_vqa"][0]), 0.0)  # spatial prompt: GIT gives 0


# ------------------------------------------------------------------------------------------------ hpsv3
@pytest.fixture(scope="module")
def hps3(tmp_path_factory):
    return tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def test_hpsv3_builds_hpsv3s_inputs_and_reads_mu_at_the_reward_token(hps3):
    base, ckpt, model, head = hps3
    r = build_reward("hpsv3", checkpoint=ckpt, base_model_path=base, pixels=56 * 56, batch_size=4)
    images = _images(3, size=(60, 50))
    prompts = ["a cat", "two red buses on a long road", "x"]
    batch = r.inputs(images, prompts)
    # 60 x 50 -> smart_resize to 56 x 56 -> 4 x 4 patches of 14 -> 2 x 2 merged: 4 image tokens
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    first = r.tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    from margrpo.rewards.hpsv3 import INSTRUCTION, PROMPT_WITH_SPECIAL_TOKEN

    assert first == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
                     + INSTRUCTION.format(text_prompt="a cat") + PROMPT_WITH_SPECIAL_TOKEN
                     + "<|im_end|>\n<|im_start|>assistant\n")
    out = r(images, prompts)
    assert bool(out.valid.all()), out.reasons
    # by hand, with the model as built (not as loaded): hidden state at <|Reward|> -> head -> mu
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
        for i in range(3):
            pos = int((batch["input_ids"][i] == r.reward_id).nonzero())
            mu, sigma = head(hidden[i, pos])
            assert float(out.scores[i]) == pytest.approx(float(mu), abs=1e-5)
            assert float(out.components["sigma"][i]) == pytest.approx(float(sigma), abs=1e-5)
    one = build_reward("hpsv3", checkpoint=ckpt, base_model_path=base, pixels=56 * 56, batch_size=1)(images, prompts)
    torch.testing.assert_close(one.scores, out.scores, atol=1e-5, rtol=0)  # right padding leaves the token alone
    scaled = build_reward("hpsv3", checkpoint=ckpt, base_model_path=base, pixels=56 * 56, scale=0.2)(images, prompts)
    torch.testing.assert_close(scaled.scores, 0.2 * out.scores)


def test_hpsv3_reads_the_older_key_layout_and_refuses_mismatches(tmp_path, hps3):
    base, ckpt, _, _ = hps3
    old_base, old_ckpt, _, _ = tiny_hpsv3(tmp_path / "old", old_layout=True)
    images = _images(2, size=(56, 56))
    new = build_reward("hpsv3", checkpoint=ckpt, base_model_path=base, pixels=56 * 56)(images, ["a", "b"])
    old = build_reward("hpsv3", checkpoint=old_ckpt, base_model_path=old_base, pixels=56 * 56)(images, ["a", "b"])
    torch.testing.assert_close(old.scores, new.scores)  # same seed, same weights, other key names
    bf = build_reward("hpsv3", checkpoint=ckpt, base_model_path=base, pixels=56 * 56, dtype="bfloat16")
    assert bf.model.dtype == torch.bfloat16 and bool(bf(images, ["a", "b"]).valid.all())
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpt))
    sd["rm_head.7.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not HPSv3's ranknet head"):
        build_reward("hpsv3", checkpoint=tmp_path / "bad.safetensors", base_model_path=base)
    with pytest.raises(FileNotFoundError, match="not a .safetensors file"):
        build_reward("hpsv3", checkpoint=tmp_path / "HPSv3.pt", base_model_path=base)
