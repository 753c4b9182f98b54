"""Renderer of the shapes world: anti-aliased coloured circles, squares and triangles on a plain canvas.

Two layers: `draw_scene` draws an explicit list of `SceneObject`s; `layout_scene` turns prompt
metadata into such a list (sizes and positions drawn from an explicit numpy Generator, objects kept
apart and inside the canvas, relations held with a margin). `render_scene` does both.

Geometry is in canvas pixels, floats. Shapes are drawn at `supersample` times the size with PIL and
box-filtered down, so an edge pixel holds the exact coverage blend of colour and background, which
is what the verifier's blend model expects. Every length scales with the canvas: the defaults below
are stated for a 32-pixel canvas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from .spec import BACKGROUND, PALETTE, SHAPES, PromptSpec, relation_strength

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKGROUND",
    "PALETTE",
    "LayoutConfig",
    "PlacementError",
    "SceneObject",
    "draw_scene",
    "images_to_tensor",
    "layout_scene",
    "render_batch",
    "render_scene",
    "tensor_to_images",
]

_TRIANGLE_HEIGHT = math.sqrt(3.0) / 2.0  # equilateral: height / base


class PlacementError(ValueError):
    """The requested objects cannot be placed without overlap (canvas too small or too many objects)."""


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. (cx, cy) is the centre of its bounding box; `size` is the box width.

    Circles and squares have a size x size box; the triangle is equilateral, pointing up, with base
    `size` and height size * sqrt(3) / 2.
    """

    shape: str
    colour: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid shapes: {', '.join(SHAPES)}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; valid colours: {', '.join(PALETTE)}")
        if not self.size > 0:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def height(self) -> float:
        return self.size * _TRIANGLE_HEIGHT if self.shape == "triangle" else self.size

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1), right and bottom exclusive."""
        h = self.height
        return (self.cx - self.size / 2, self.cy - h / 2, self.cx + self.size / 2, self.cy + h / 2)

    @property
    def centroid(self) -> tuple[float, float]:
        """Centre of mass (what the verifier measures); a triangle's lies h/6 below its box centre."""
        if self.shape == "triangle":
            return (self.cx, self.cy + self.height / 6.0)
        return (self.cx, self.cy)

    @property
    def extent(self) -> tuple[float, float]:
        return (self.size, self.height)


@dataclass(frozen=True)
class LayoutConfig:
    """Layout rules as fractions of the canvas side (values in comments are pixels at 32)."""

    min_size: float = 7 / 32  # 7 px
    max_size: float = 12 / 32  # 12 px
    gap: float = 2 / 32  # 2 px between bounding boxes, so anti-aliased edges never touch
    border: float = 1 / 32  # 1 px between a box and the canvas edge
    relation_offset: float = 0.2  # 6.4 px: minimum centroid offset along a relation's axis
    relation_strength: float = 0.75  # GenEval-style strength demanded (the verifier accepts > 0.5)
    position_tries: int = 100  # positions tried per object before the whole layout restarts
    layout_tries: int = 50  # full restarts (with fresh sizes) before giving up


def _disjoint(a: SceneObject, b: SceneObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _as_spec(metadata: PromptSpec | Mapping[str, Any] | str) -> PromptSpec:
    if isinstance(metadata, PromptSpec):
        return metadata
    if isinstance(metadata, str):
        from .prompts import parse_prompt

        return parse_prompt(metadata)
    return PromptSpec.from_dict(metadata)


def layout_scene(
    metadata: PromptSpec | Mapping[str, Any] | str,
    rng: np.random.Generator,
    size: int = 32,
    config: LayoutConfig | None = None,
) -> list[SceneObject]:
    """Objects that satisfy the metadata: counts and colours, and the relation with margin.

    Rejection sampling: objects are placed one at a time at uniform positions that keep them inside
    the canvas and apart from those already placed (and, for the second object of a relation, in
    relation to the first); a layout that gets stuck restarts with fresh sizes. Raises PlacementError
    if `layout_tries` restarts all fail, which only happens for canvases too small for the objects.
    """
    cfg = config or LayoutConfig()
    spec = _as_spec(metadata)
    kinds = [(o.shape, o.colour) for o in spec.objects for _ in range(o.count)]
    rel = spec.relation
    gap, border = cfg.gap * size, cfg.border * size
    for _ in range(cfg.layout_tries):
        sizes = rng.uniform(cfg.min_size * size, cfg.max_size * size, size=len(kinds))
        placed: list[SceneObject] = []
        for (shape, colour), s in zip(kinds, sizes, strict=True):
            h = s * _TRIANGLE_HEIGHT if shape == "triangle" else s
            lo_x, hi_x = border + s / 2, size - border - s / 2
            lo_y, hi_y = border + h / 2, size - border - h / 2
            if lo_x > hi_x or lo_y > hi_y:
                break
            for _ in range(cfg.position_tries):
                obj = SceneObject(
                    shape, colour, float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)), s
                )
                if not all(_disjoint(obj, p, gap) for p in placed):
                    continue
                if rel is not None and len(placed) == 1:
                    subject, other = (placed[0], obj) if rel.a == 0 else (obj, placed[0])
                    if not _relation_ok(subject, other, rel.relation, size, cfg):
                        continue
                placed.append(obj)
                break
            else:
                break
        if len(placed) == len(kinds):
            return placed
    raise PlacementError(
        f"could not place {len(kinds)} object(s) {kinds} without overlap on a {size}x{size} canvas "
        f"(sizes {cfg.min_size * size:.1f}-{cfg.max_size * size:.1f} px, gap {gap:.1f} px) after "
        f"{cfg.layout_tries} attempts; use a larger canvas, fewer objects or smaller sizes"
    )


def _relation_ok(a: SceneObject, b: SceneObject, relation: str, size: int, cfg: LayoutConfig) -> bool:
    """'a <relation> b' with the renderer's margins (stricter than the verifier's)."""
    ca, cb = a.centroid, b.centroid
    axis = 0 if relation in ("left of", "right of") else 1
    if abs(ca[axis] - cb[axis]) < cfg.relation_offset * size:
        return False
    return relation_strength(ca, cb, a.extent, b.extent, relation) >= cfg.relation_strength


def _supersample_for(size: int) -> int:
    return max(2, min(8, 512 // max(size, 1)))


def draw_scene(objects: Sequence[SceneObject], size: int = 32, supersample: int | None = None) -> Image.Image:
    """Draw explicit objects on a size x size RGB canvas, anti-aliased by box-filtered supersampling."""
    ss = supersample or _supersample_for(size)
    big = Image.new("RGB", (size * ss, size * ss), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in objects:
        x0, y0, x1, y1 = (v * ss for v in obj.bbox)
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return big.resize((size, size), Image.Resampling.BOX)


def render_scene(
    metadata: PromptSpec | Mapping[str, Any] | str,
    rng: np.random.Generator,
    size: int = 32,
    config: LayoutConfig | None = None,
) -> Image.Image:
    """An image that satisfies the prompt metadata (PromptSpec, its dict form, or prompt text)."""
    return draw_scene(layout_scene(metadata, rng, size, config), size)


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (same size) -> float32 tensor [B, 3, H, W] in [-1, 1]."""
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """Inverse of `images_to_tensor` (values clipped to [-1, 1], rounded to uint8)."""
    import torch

    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGB") for a in arr]


def render_batch(
    prompts: Sequence[PromptSpec | Mapping[str, Any] | str],
    rng: np.random.Generator,
    size: int = 32,
) -> torch.Tensor:
    """Render one image per prompt into a [B, 3, size, size] tensor in [-1, 1] (pretraining data)."""
    return images_to_tensor([render_scene(p, rng, size) for p in prompts])
