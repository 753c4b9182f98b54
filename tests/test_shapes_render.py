"""Renderer of the shapes world: geometry rules, determinism, anti-aliasing, tensor helpers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from margrpo.worlds import shapes
from margrpo.worlds.shapes.render import (
    LayoutConfig,
    PlacementError,
    SceneObject,
    draw_scene,
    images_to_tensor,
    layout_scene,
    render_batch,
    render_scene,
    tensor_to_images,
)
from margrpo.worlds.shapes.spec import PALETTE, relation_strength

torch.set_num_threads(1)


def test_palette_has_the_required_colours_far_apart() -> None:
    for name in ("red", "green", "blue", "yellow", "purple", "orange"):
        assert name in PALETTE
    rgb = np.array(list(PALETTE.values()), dtype=float)
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(dists) > 80
    bg = np.array(shapes.BACKGROUND, dtype=float)
    assert min(np.linalg.norm(rgb - bg, axis=1)) > 200


def test_render_is_deterministic_given_the_generator() -> None:
    p = "a blue square left of a red circle"
    a = np.asarray(render_scene(p, np.random.default_rng(7)))
    b = np.asarray(render_scene(p, np.random.default_rng(7)))
    c = np.asarray(render_scene(p, np.random.default_rng(8)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("size", [32, 48, 64, 256])
def test_render_returns_rgb_image_of_requested_size(size: int) -> None:
    img = render_scene("three yellow circles", np.random.default_rng(0), size=size)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert img.size == (size, size)


@pytest.mark.parametrize("size", [32, 64])
def test_layouts_stay_inside_apart_and_in_size_range(size: int) -> None:
    rng = np.random.default_rng(1)
    cfg = LayoutConfig()
    prompts = (
        shapes.train_prompts("counting")
        + shapes.train_prompts("colour_attr")
        + shapes.heldout_prompts()[:100]
    )
    for p in prompts:
        objs = layout_scene(p, rng, size)
        spec = shapes.parse_prompt(p)
        assert sorted((o.colour, o.shape) for o in objs) == sorted(
            (o.colour, o.shape) for o in spec.objects for _ in range(o.count)
        )
        for o in objs:
            x0, y0, x1, y1 = o.bbox
            assert x0 >= cfg.border * size - 1e-9 and y0 >= cfg.border * size - 1e-9
            assert x1 <= size * (1 - cfg.border) + 1e-9 and y1 <= size * (1 - cfg.border) + 1e-9
            assert cfg.min_size * size <= o.size <= cfg.max_size * size
        for a, b in itertools.combinations(objs, 2):
            ax0, ay0, ax1, ay1 = a.bbox
            bx0, by0, bx1, by1 = b.bbox
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= cfg.gap * size - 1e-9, (p, a, b)


def test_position_layouts_hold_the_relation_with_margin() -> None:
    rng = np.random.default_rng(2)
    for p in shapes.train_prompts("position")[::3]:
        spec = shapes.parse_prompt(p)
        rel = spec.relation
        assert rel is not None
        a, b = layout_scene(spec, rng, 32)
        (ax, ay), (bx, by) = a.centroid, b.centroid
        off = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel.relation]
        assert off >= 0.2 * 32
        assert relation_strength(a.centroid, b.centroid, a.extent, b.extent, rel.relation) >= 0.75


def test_triangle_centroid_is_below_box_centre() -> None:
    t = SceneObject("triangle", "red", 16, 16, 12)
    assert t.centroid[1] > 16 and t.height == pytest.approx(12 * np.sqrt(3) / 2)
    # Measured centroid of the drawn triangle matches the analytic one to a fraction of a pixel.
    arr = 255.0 - np.asarray(draw_scene([t], 32), dtype=float).mean(axis=2)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    assert (arr * ys).sum() / arr.sum() == pytest.approx(t.centroid[1], abs=0.15)
    assert (arr * xs).sum() / arr.sum() == pytest.approx(t.centroid[0], abs=0.15)


def test_drawing_is_antialiased_and_uses_palette_colours() -> None:
    obj = SceneObject("circle", "purple", 15.3, 16.7, 11.0)
    arr = np.asarray(draw_scene([obj], 32)).reshape(-1, 3)
    colours = {tuple(int(v) for v in px) for px in arr}
    assert PALETTE["purple"] in colours
    assert shapes.BACKGROUND in colours
    # Anti-aliased edge pixels: blends that are neither background nor the colour.
    assert len(colours) > 5
    # Every pixel lies on the segment background -> purple (a pure coverage blend).
    bg = np.array(shapes.BACKGROUND, float)
    d = np.array(PALETTE["purple"], float) - bg
    alpha = np.clip((arr - bg) @ d / (d @ d), 0, 1)
    resid = np.linalg.norm(arr - bg - alpha[:, None] * d, axis=1)
    assert resid.max() < 2.0
    # Area of the drawn disk (sum of coverage) matches pi r^2.
    assert alpha.sum() == pytest.approx(np.pi * 5.5**2, rel=0.03)


def test_render_accepts_spec_dict_and_text() -> None:
    spec = shapes.parse_prompt("an orange triangle above a green square")
    imgs = [
        np.asarray(render_scene(x, np.random.default_rng(3)))
        for x in (spec, spec.to_dict(), "an orange triangle above a green square")
    ]
    assert np.array_equal(imgs[0], imgs[1]) and np.array_equal(imgs[0], imgs[2])


def test_impossible_placement_raises_a_clear_error() -> None:
    cfg = LayoutConfig(min_size=0.45, max_size=0.45, layout_tries=5, position_tries=20)
    with pytest.raises(PlacementError, match=r"could not place 4 object\(s\).*32x32"):
        layout_scene("four red squares", np.random.default_rng(0), 32, cfg)


def test_scene_object_rejects_unknown_words() -> None:
    with pytest.raises(ValueError, match="valid shapes"):
        SceneObject("hexagon", "red", 5, 5, 5)
    with pytest.raises(ValueError, match="valid colours"):
        SceneObject("circle", "pink", 5, 5, 5)


def test_render_batch_gives_tensor_in_range_and_round_trips() -> None:
    prompts = ["a red circle", "two blue squares", "a green triangle and a purple circle"]
    x = render_batch(prompts, np.random.default_rng(4), size=32)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.max() == 1.0  # white background
    imgs = [render_scene(p, np.random.default_rng(5)) for p in prompts]
    back = tensor_to_images(images_to_tensor(imgs))
    for a, b in zip(imgs, back, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
