"""Reward protocol, registry, weighted sum, failure accounting, async scoring and the model-free rewards."""

from __future__ import annotations

import io
import math
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from margrpo.rewards import (
    CompositeReward,
    Reward,
    RewardFailure,
    RewardFailureGuard,
    RewardFn,
    RewardOutput,
    available_rewards,
    build_reward,
    build_rewards,
    to_pil_images,
)

torch.set_num_threads(1)

ALL_REWARDS = {"shapes", "jpeg_compressibility", "jpeg_incompressibility", "clip_score", "pickscore", "hpsv2",
               "imagereward", "aesthetic", "remote", "colour_fraction", "random", "grounding_dino", "git_vqa",
               "geneval", "hpsv3"}


def _imgs(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


class Const(Reward):
    """Test reward: returns fixed values (nan allowed), optionally raising or sleeping."""

    name = "const"

    def __init__(self, values=None, raise_exc: Exception | None = None, sleep_s: float = 0.0, **kw):
        super().__init__(**kw)
        self.values, self.raise_exc, self.sleep_s = values, raise_exc, sleep_s
        self.calls: list[int] = []
        self.grad_enabled: list[bool] = []

    def score_batch(self, images, prompts, metadata):
        self.calls.append(len(images))
        self.grad_enabled.append(torch.is_grad_enabled())
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.raise_exc is not None:
            raise self.raise_exc
        if self.values is None:  # mean pixel value: depends on the image, so order mistakes show
            vals = [float(np.asarray(im.convert("L"), dtype=np.float64).mean()) for im in images]
        else:
            vals = [self.values[m.get("i", 0)] if m else self.values[0] for m in metadata]
        return torch.tensor(vals), {"double": 2 * torch.tensor(vals)}


def test_registry_has_every_builtin_reward():
    assert ALL_REWARDS <= set(available_rewards())
    with pytest.raises(KeyError, match="unknown reward 'nope'.*jpeg_compressibility"):
        build_reward("nope")


def test_output_validation_and_summary_skip_nonfinite():
    out = RewardOutput(torch.tensor([1.0, math.nan, 3.0]), torch.tensor([True, False, True]),
                       {"c": torch.tensor([0.0, 5.0, math.nan])}, categories=["a", "b", "a"])
    s = out.summary()
    assert s["reward/mean"] == pytest.approx(2.0)
    assert s["reward/c"] == pytest.approx(0.0)  # only valid & finite entries
    assert s["reward/invalid_count"] == 1 and s["reward/invalid_fraction"] == pytest.approx(1 / 3)
    assert s["reward/by_category/a"] == pytest.approx(2.0) and "reward/by_category/b" not in s
    assert all(math.isfinite(v) for v in s.values())
    with pytest.raises(ValueError, match="valid must be bool"):
        RewardOutput(torch.zeros(2), torch.zeros(3, dtype=torch.bool))


def test_base_runs_no_grad_in_chunks_and_checks_lengths():
    r = Const(batch_size=2)
    x = _imgs(5)
    with torch.enable_grad():
        out = r(x, ["p"] * 5)
    assert r.calls == [2, 2, 1] and r.grad_enabled == [False] * 3
    assert out.scores.dtype == torch.float32 and out.scores.shape == (5,) and bool(out.valid.all())
    assert torch.allclose(out.components["double"], 2 * out.scores)
    whole = Const(batch_size=8)(x, ["p"] * 5)
    assert torch.equal(whole.scores, out.scores)  # chunking does not change results
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        r(x, ["p"] * 4)
    with pytest.raises(TypeError, match="single str"):
        r(x, "p")


def test_nonfinite_scores_and_exceptions_are_flagged_not_silent():
    vals = [1.0, math.nan, math.inf, -2.0]
    out = Const(values=vals)(_imgs(4), ["p"] * 4, [{"i": i} for i in range(4)])
    assert out.valid.tolist() == [True, False, False, True]
    assert torch.isnan(out.scores[1:3]).all() and out.scores[3] == -2.0
    assert out.reasons[0] is None and out.reasons[1].startswith("nonfinite")
    failing = Const(raise_exc=RuntimeError("model exploded"))
    bad = failing(_imgs(3), ["p"] * 3)
    assert not bad.valid.any() and "RuntimeError: model exploded" in bad.reasons[0]
    with pytest.raises(RuntimeError, match="exploded"):
        Const(raise_exc=RuntimeError("model exploded"), catch_errors=False)(_imgs(1), ["p"])


def test_tensor_images_follow_the_models_range_and_nan_images_are_invalid():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2).clone()
    x[1, 0, 0, 0] = math.nan
    pils, reasons = to_pil_images(x)
    assert pils[0].getpixel((0, 0)) == (0, 128, 255)  # round((x + 1) * 127.5), as margrpo.utils.images.to_pil
    assert reasons[0] is None and reasons[1].startswith("nonfinite_image")
    u8 = to_pil_images([torch.full((1, 2, 2), 7, dtype=torch.uint8)])[0][0]
    assert u8.mode == "RGB" and u8.getpixel((0, 0)) == (7, 7, 7)
    out = Const(values=[1.0])(x, ["p", "p"])
    assert out.valid.tolist() == [True, False]


def test_composite_is_weighted_sum_logs_parts_and_propagates_invalid():
    a = Const(values=[1.0, 2.0, math.nan])
    b = Const(values=[10.0, 20.0, 30.0])
    comp = CompositeReward([("a", 0.5, a), ("b", 2.0, b)])
    assert isinstance(comp, RewardFn)
    out = comp(_imgs(3), ["p"] * 3, [{"i": i} for i in range(3)])
    assert out.scores[:2].tolist() == pytest.approx([20.5, 41.0])
    assert out.valid.tolist() == [True, True, False] and "nonfinite: const" in out.reasons[2]
    assert out.components["b"].tolist() == [10.0, 20.0, 30.0]
    assert out.components["a/double"][:2].tolist() == [2.0, 4.0]
    with pytest.raises(ValueError, match="unique"):
        CompositeReward([("a", 1.0, a), ("a", 1.0, b)])


def test_build_rewards_from_config_forms():
    comp = build_rewards({"jpeg_compressibility": 1.0,
                          "inc_half": {"type": "jpeg_incompressibility", "weight": 0.5, "quality": 80}})
    assert [(lbl, w) for lbl, w, _ in comp.parts] == [("jpeg_compressibility", 1.0), ("inc_half", 0.5)]
    assert comp.parts[1][2].quality == 80
    x = _imgs(2, 24)
    out = comp(x, ["p", "p"])
    expected = 1.0 * out.components["jpeg_compressibility"] + 0.5 * out.components["inc_half"]
    assert out.scores.tolist() == pytest.approx(expected.tolist())
    assert (out.components["jpeg_compressibility"] < 0).all() and (out.components["inc_half"] > 0).all()
    opt = build_rewards({"jpeg_incompressibility": 1.0}, {"jpeg_incompressibility": {"quality": 50}})
    assert opt.parts[0][2].quality == 50
    with pytest.raises(KeyError, match="rewards.x: unknown reward type 'x'"):
        build_rewards({"x": 1.0})
    with pytest.raises(ValueError, match="weight must be a finite number"):
        build_rewards({"jpeg_compressibility": {"weight": "heavy"}})
    with pytest.raises(TypeError, match="jpeg_compressibility.*bad options.*colour"):
        build_rewards({"jpeg_compressibility": {"colour": 1}})
    with pytest.raises(KeyError, match="not in rewards"):
        build_rewards({"jpeg_compressibility": 1.0}, {"hpsv2": {}})


def test_failure_guard_counts_and_raises_with_fraction():
    guard = RewardFailureGuard(max_invalid_fraction=0.25, min_samples=8)
    ok = RewardOutput(torch.ones(4), torch.ones(4, dtype=torch.bool))
    bad = Const(raise_exc=OSError("disk"))(_imgs(4), ["p"] * 4)
    guard.update(bad)  # 4/4 invalid but fewer than min_samples seen: not judged yet
    with pytest.raises(RewardFailure) as ei:
        guard.update(ok)  # 4/8 = 50% > 25%
    e = ei.value
    assert e.fraction == pytest.approx(0.5) and e.invalid == 4 and e.total == 8
    assert e.reasons == {"error": 4} and "50.0%" in str(e) and "OSError: disk" in str(e)
    # the failing batch is not counted: the checkpoint saved on failure precedes it, and a resume repeats it
    assert guard.state_dict() == {"total": 4, "invalid": 4, "reasons": {"error": 4}}
    g2 = RewardFailureGuard(0.25, min_samples=1)
    g2.load_state_dict({"total": 100, "invalid": 10, "reasons": {"nonfinite": 10}})
    g2.update(ok)
    assert g2.metrics()["reward/run_invalid_fraction"] == pytest.approx(10 / 104)


def test_jpeg_rewards_match_ddpo_definition():
    flat = Image.new("RGB", (64, 64), (120, 30, 200))
    noisy = to_pil_images(_imgs(1, 64, seed=3))[0][0]
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=95)
    inc = build_reward("jpeg_incompressibility")([flat, noisy], ["a", "b"])
    comp = build_reward("jpeg_compressibility")([flat, noisy], ["a", "b"])
    assert inc.scores[1].item() == pytest.approx(buf.tell() / 1000)
    assert inc.scores[1] > inc.scores[0] and comp.scores[0] > comp.scores[1]
    assert torch.equal(comp.scores, -inc.scores)
    with pytest.raises(ValueError, match="quality must be in"):
        build_reward("jpeg_compressibility", quality=0)


def test_shapes_reward_wraps_verifier(monkeypatch):
    """The wrapper's contract, against a stand-in verifier with the documented API."""
    calls = {}

    def score(images, prompts):
        calls["n"] = (len(images), type(images[0]).__name__)
        partial, cats = [1.0, 0.5, float("nan")], ["count", "color", "count"]
        return [{"strict": i % 2 == 0, "partial": partial[i], "category": cats[i]} for i in range(len(images))]

    fake = types.ModuleType("margrpo.worlds.shapes")
    fake.score = score
    monkeypatch.setitem(sys.modules, "margrpo.worlds.shapes", fake)
    out = build_reward("shapes")(_imgs(3), ["a", "b", "c"])
    assert calls["n"] == (3, "Image")
    assert out.scores[:2].tolist() == [1.0, 0.5] and out.valid.tolist() == [True, True, False]
    assert out.components["strict"][:2].tolist() == [1.0, 0.0] and out.categories == ["count", "color", "count"]
    strict = build_reward("shapes", mode="strict")(_imgs(3), ["a", "b", "c"])
    assert strict.scores[:2].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="mode must be one of"):
        build_reward("shapes", mode="fuzzy")
    monkeypatch.setitem(sys.modules, "margrpo.worlds.shapes", None)
    with pytest.raises(ImportError, match="needs margrpo.worlds.shapes"):
        build_reward("shapes")


def test_shapes_reward_with_real_world():
    world = pytest.importorskip("margrpo.worlds.shapes", reason="shapes world not landed yet")
    if not hasattr(world, "score") or not hasattr(world, "render_scene"):
        pytest.skip("margrpo.worlds.shapes has no score()/render_scene() yet")
    prompt = "a red circle left of a blue square"
    good = world.render_scene(prompt, np.random.default_rng(0))
    blank = Image.new("RGB", good.size, (255, 255, 255))
    out = build_reward("shapes")([good, blank, good], [prompt, prompt, "a purple unicorn"])
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert out.scores[0] == 1.0 and out.components["strict"][0] == 1.0
    assert 0.0 <= float(out.scores[1]) < 1.0 and out.components["strict"][1] == 0.0
    assert out.valid.tolist() == [True, True, False]  # only the out-of-grammar prompt is lost
    assert set(out.components) == {"strict", "partial"} and out.categories is not None


def test_importing_rewards_is_cheap_and_empty_batches_work():
    import subprocess

    code = ("import sys, margrpo.rewards; bad = [m for m in ('transformers', 'open_clip', 'torchvision') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = build_reward("jpeg_compressibility")([], [])
    assert len(out) == 0 and out.summary()["reward/invalid_count"] == 0


def test_random_null_control_is_uniform_deterministic_and_keyed():
    from margrpo.rewards import build_rewards

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2000)]
    r = build_rewards({"random": 1.0})
    a = r(images, ["a red circle"] * len(images)).scores
    assert torch.equal(a, r(images, ["two blue squares"] * len(images)).scores)  # same image, same score
    assert 0.0 <= float(a.min()) and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 0.02 and abs(float(a.var()) - 1 / 12) < 0.01  # uniform moments
    # a one-pixel change is a new independent draw, so the score cannot be climbed by small steps
    arr = np.asarray(images[0]).copy()
    arr[0, 0, 0] ^= 1
    nudged = r([Image.fromarray(arr)] * 1, ["a red circle"]).scores
    assert float(nudged[0]) != float(a[0])
    other = build_rewards({"random": {"seed": 1}})(images[:200], ["a red circle"] * 200).scores
    assert abs(float(np.corrcoef(a[:200].numpy(), other.numpy())[0, 1])) < 0.2
