"""Verifier of the shapes world: accuracy on the renderer's images, rejection of wrong prompts,
GenEval-style check semantics, robustness to degenerate inputs, the component labeller, speed."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from margrpo.worlds import shapes
from margrpo.worlds.shapes import detection
from margrpo.worlds.shapes.render import SceneObject, draw_scene, images_to_tensor
from margrpo.worlds.shapes.spec import (
    COLOURS,
    INVERSE_RELATION,
    PALETTE,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    RelationSpec,
)

torch.set_num_threads(1)

N_PER_CATEGORY = 800


def _wrong_prompt(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A prompt that the image rendered for `spec` does not satisfy (colour, shape, count or relation)."""
    o = spec.objects
    if spec.category == "single":
        if rng.random() < 0.5:
            others = [c for c in COLOURS if c != o[0].colour]
            return PromptSpec("single", (ObjectSpec(o[0].shape, others[rng.integers(len(others))]),))
        others = [s for s in SHAPES if s != o[0].shape]
        return PromptSpec("single", (ObjectSpec(others[rng.integers(len(others))], o[0].colour),))
    if spec.category == "counting":
        n = o[0].count
        m = n + 1 if n == 1 or (n < 4 and rng.random() < 0.5) else n - 1
        return PromptSpec("counting", (ObjectSpec(o[0].shape, o[0].colour, m),))
    if spec.category == "colour_attr":  # swap the colours between the two objects
        a, b = o
        return PromptSpec("colour_attr", (ObjectSpec(a.shape, b.colour), ObjectSpec(b.shape, a.colour)))
    rel = spec.relation
    assert rel is not None
    return PromptSpec("position", o, RelationSpec(rel.a, rel.b, INVERSE_RELATION[rel.relation]))


@pytest.fixture(scope="module")
def rendered() -> dict[str, tuple[list[str], list[Image.Image]]]:
    """N_PER_CATEGORY renders per category: train and held-out prompts alike, 32 px."""
    rng = np.random.default_rng(2024)
    out = {}
    for cat in shapes.CATEGORIES:
        pool = shapes.all_prompts(cat)
        prompts = [pool[i] for i in rng.integers(len(pool), size=N_PER_CATEGORY)]
        out[cat] = (prompts, [shapes.render_scene(p, rng) for p in prompts])
    return out


@pytest.mark.parametrize("category", ["single", "colour_attr", "counting", "position"])
def test_accepts_renders_of_the_prompt(rendered, category: str) -> None:
    prompts, images = rendered[category]
    results = shapes.score(images, prompts)
    tp = np.mean([r["strict"] for r in results])
    assert tp >= 0.99, [r["checks"] for r in results if not r["strict"]][:5]
    assert all(r["category"] == category for r in results)
    assert all(0.0 <= r["partial"] <= 1.0 for r in results)


@pytest.mark.parametrize("category", ["single", "colour_attr", "counting", "position"])
def test_rejects_renders_of_a_different_prompt(rendered, category: str) -> None:
    prompts, images = rendered[category]
    rng = np.random.default_rng(7)
    wrong = [_wrong_prompt(shapes.parse_prompt(p), rng) for p in prompts]
    results = shapes.score(images, wrong)
    tn = 1.0 - np.mean([r["strict"] for r in results])
    assert tn >= 0.99
    assert np.mean([r["partial"] for r in results]) < 0.95  # partial credit, but less than full


@pytest.mark.parametrize("size", [64, 256])
def test_accuracy_holds_at_larger_sizes(size: int) -> None:
    rng = np.random.default_rng(size)
    prompts = [shapes.sample_train_prompt(rng, c) for c in shapes.CATEGORIES for _ in range(25)]
    images = [shapes.render_scene(p, rng, size=size) for p in prompts]
    assert all(r["strict"] for r in shapes.score(images, prompts))


def test_non_square_images_keep_their_shapes() -> None:
    """A 96x64 canvas with 64-px content: padded to square, not squashed (circles stay circles)."""
    rng = np.random.default_rng(12)
    prompts = [shapes.sample_train_prompt(rng, c) for c in shapes.CATEGORIES for _ in range(25)]
    images = []
    for i, p in enumerate(prompts):
        wide = Image.new("RGB", (96, 64) if i % 2 else (64, 96), shapes.BACKGROUND)
        wide.paste(shapes.render_scene(p, rng, size=64), (0, 0))
        images.append(wide)
    assert all(r["strict"] for r in shapes.score(images, prompts))


def test_tolerates_mild_degradation() -> None:
    """Model outputs are not clean renders: noise, blur, an off-white background."""
    rng = np.random.default_rng(3)
    prompts = [shapes.sample_train_prompt(rng, c) for c in shapes.CATEGORIES for _ in range(50)]
    images = []
    for i, p in enumerate(prompts):
        arr = np.asarray(shapes.render_scene(p, rng, size=64), dtype=float)
        if i % 3 == 0:
            arr = arr + rng.normal(0, 15, arr.shape)
        elif i % 3 == 1:
            arr = np.where((arr == 255).all(axis=2, keepdims=True), 228.0, arr)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        images.append(img.filter(ImageFilter.GaussianBlur(0.8)) if i % 3 == 2 else img)
    assert np.mean([r["strict"] for r in shapes.score(images, prompts)]) >= 0.98


def test_score_tensors_matches_score(rendered) -> None:
    prompts, images = rendered["position"]
    a = shapes.score(images[:64], prompts[:64])
    b = shapes.score_tensors(images_to_tensor(images[:64]), prompts[:64])
    assert [r["strict"] for r in a] == [r["strict"] for r in b]
    assert np.allclose([r["partial"] for r in a], [r["partial"] for r in b])


def _degenerate_images(rng: np.random.Generator) -> dict[str, Image.Image]:
    imgs = {
        "noise32": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        "noise256": Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)),
        "blank": Image.new("RGB", (32, 32), shapes.BACKGROUND),
        "black": Image.new("RGB", (32, 32), (0, 0, 0)),
        "grey": Image.new("RGB", (64, 64), (128, 128, 128)),
        "nonsquare": Image.new("RGB", (48, 33), (255, 255, 255)),
        "gray_mode": Image.new("L", (40, 40), 200),
    }
    for c, rgb in PALETTE.items():
        imgs[f"flood_{c}"] = Image.new("RGB", (32, 32), rgb)
    return imgs


def test_degenerate_images_score_false_without_crashing() -> None:
    rng = np.random.default_rng(5)
    prompts = [
        "a red circle",
        "three red circles",
        "a red square and a blue circle",
        "a red square above a blue circle",
    ]
    for name, img in _degenerate_images(rng).items():
        for p in prompts:
            (r,) = shapes.score([img], [p])
            assert r["strict"] is False, (name, p)
            assert 0.0 <= r["partial"] <= 1.0
            assert r["partial"] == 0.0 or name.startswith("noise"), (name, p, r["checks"])


def test_pure_noise_never_passes() -> None:
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 256, (400, 32, 32, 3)).astype(np.float32)
    prompts = [shapes.sample_train_prompt(rng) for _ in range(400)]
    assert not any(r["strict"] for r in shapes.score_arrays(noise, prompts))


# --- check semantics on hand-made scenes ----------------------------------------------------------


def _scene(*objs: tuple[str, str, float, float, float]) -> Image.Image:
    return draw_scene([SceneObject(s, c, x, y, z) for s, c, x, y, z in objs], 32)


def test_exact_counts_and_unrelated_objects() -> None:
    red_circle = ("circle", "red", 8, 8, 9)
    (r,) = shapes.score([_scene(red_circle)], ["a red circle"])
    assert r["strict"] and r["partial"] == 1.0 and r["n_unrelated"] == 0
    # An object of a shape the prompt does not name is ignored (as GenEval ignores other classes).
    (r,) = shapes.score([_scene(red_circle, ("square", "blue", 22, 22, 9))], ["a red circle"])
    assert r["strict"] and r["n_unrelated"] == 1
    # A second red circle breaks the exact count.
    (r,) = shapes.score([_scene(red_circle, ("circle", "red", 22, 22, 9))], ["a red circle"])
    assert not r["strict"] and r["checks"]["count[0]"] == 0.0
    # A blue circle next to the red one confuses a class-then-colour detector: purity 1/2.
    (r,) = shapes.score([_scene(red_circle, ("circle", "blue", 22, 22, 9))], ["a red circle"])
    assert not r["strict"] and r["checks"]["purity[circle]"] == 0.5
    assert r["partial"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_partial_credit_for_counts_colours_and_shapes() -> None:
    two = _scene(("circle", "yellow", 8, 8, 9), ("circle", "yellow", 22, 22, 9))
    (r,) = shapes.score([two], ["three yellow circles"])
    assert r["checks"]["count[0]"] == pytest.approx(2 / 3) and not r["strict"]
    (r,) = shapes.score([two], ["four yellow circles"])
    assert r["checks"]["count[0]"] == pytest.approx(0.5)
    (r,) = shapes.score([_scene(("square", "red", 16, 16, 10))], ["a red circle"])
    assert r["checks"] == {"count[0]": 0.0, "colour[0]": 1.0, "shape[0]": 0.0, "purity[circle]": 0.0}
    (r,) = shapes.score([_scene(("circle", "blue", 16, 16, 10))], ["a red circle"])
    assert r["checks"] == {"count[0]": 0.0, "colour[0]": 0.0, "shape[0]": 1.0, "purity[circle]": 0.0}


@pytest.mark.parametrize(
    ("b_pos", "holds"),
    [
        ((24, 8), {"left of"}),  # B straight right of A
        ((8, 24), {"above"}),  # B straight below A
        ((24, 11), {"left of"}),  # mostly horizontal
        ((23, 23), {"left of", "above"}),  # exact diagonal: GenEval accepts both
        ((10, 24), {"above"}),  # A barely left of B: horizontal offset shrunk away
    ],
)
def test_relation_follows_geneval_rule(b_pos: tuple[float, float], holds: set[str]) -> None:
    img = _scene(("square", "red", 8, 8, 8), ("circle", "blue", b_pos[0], b_pos[1], 8))
    for rel in ("left of", "right of", "above", "below"):
        (r,) = shapes.score([img], [f"a red square {rel} a blue circle"])
        assert r["strict"] == (rel in holds), (rel, r["checks"])


def test_summarize_per_category_and_geneval_overall() -> None:
    results = [
        {"category": "single", "strict": True, "partial": 1.0},
        {"category": "single", "strict": False, "partial": 0.5},
        {"category": "position", "strict": False, "partial": 0.0},
    ]
    s = shapes.summarize(results)
    assert s["single"] == {"strict": 0.5, "partial": 0.75, "n": 2}
    assert s["position"] == {"strict": 0.0, "partial": 0.0, "n": 1}
    assert s["overall"] == {"strict": 0.25, "partial": 0.375, "n": 3}
    assert shapes.summarize([]) == {}


def test_input_errors_are_clear() -> None:
    img = Image.new("RGB", (32, 32), shapes.BACKGROUND)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        shapes.score([img, img], ["a red circle"])
    with pytest.raises(ValueError, match="one prompt per image"):
        shapes.score([img], "a red circle")
    with pytest.raises(ValueError, match=r"prompt 1: .*'pink'"):
        shapes.score([img, img], ["a red circle", "a pink circle"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        shapes.score_tensors(torch.zeros(3, 32, 32), ["a red circle"])


# --- internals -----------------------------------------------------------------------------------


def _reference_components(cls: np.ndarray) -> np.ndarray:
    """Breadth-first 4-connected labelling of equal positive values (slow, obviously right)."""
    lab = np.full(cls.shape, -1)
    n = 0
    for start in zip(*np.nonzero(cls > 0), strict=True):
        if lab[start] >= 0:
            continue
        lab[start] = n
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                q = (y + dy, x + dx)
                if (
                    0 <= q[0] < cls.shape[0]
                    and 0 <= q[1] < cls.shape[1]
                    and lab[q] < 0
                    and cls[q] == cls[y, x]
                ):
                    lab[q] = n
                    queue.append(q)
        n += 1
    return lab


def test_labeller_matches_breadth_first_search() -> None:
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 4, (6, 20, 20)) * (rng.random((6, 20, 20)) < 0.6)
    spiral = np.zeros((20, 20), dtype=int)  # a long snake needs many propagation steps
    for i in range(0, 20, 4):
        spiral[i, : 19 if i % 8 == 0 else 20] = 1
        spiral[i : i + 4, 19 if i % 8 == 0 else 0] = 1
    raw[0] = spiral
    cls = np.zeros((6, 22, 22), dtype=np.int16)
    cls[:, 1:-1, 1:-1] = raw
    roots = detection._label(cls).reshape(cls.shape)[:, 1:-1, 1:-1]
    for i in range(6):
        ref = _reference_components(raw[i])
        fg = raw[i] > 0
        pairs = set(zip(ref[fg].tolist(), roots[i][fg].tolist(), strict=True))
        assert len(pairs) == len(set(ref[fg].tolist())) == len(set(roots[i][fg].tolist()))


def test_detects_each_shape_at_extreme_sizes() -> None:
    for shape in SHAPES:
        for colour in COLOURS:
            for size in (7.0, 12.0):
                dets = shapes.detect(_scene((shape, colour, 15.6, 16.3, size)))
                assert [(d.colour, d.shape) for d in dets] == [(colour, shape)]


def test_detection_is_fast() -> None:
    rng = np.random.default_rng(9)
    prompts = [shapes.sample_train_prompt(rng) for _ in range(256)]
    arr = detection.to_work_array([shapes.render_scene(p, rng) for p in prompts])
    detection.detect_batch(arr[:8])
    t0 = time.perf_counter()
    detection.detect_batch(arr)
    per_image = (time.perf_counter() - t0) / len(arr)
    assert per_image < 2e-3, f"{per_image * 1e3:.2f} ms per image"
