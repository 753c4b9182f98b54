"""Object detection for the shapes world, numpy only and batched: pixels -> colours -> components -> shapes.

1. Working resolution. Images are box-filtered to `WORK_SIZE` (32) pixels a side: a 256-pixel render
   then matches the 32-pixel render of the same scene (both are exact coverage averages), and every
   threshold below is fixed in working pixels. Non-square images are first padded to a square with
   their own border colour (squashing would turn circles into ellipses); objects then shrink with the
   long side, so very elongated images lose their smallest objects.
2. Pixel colour. Each pixel p is modelled as a blend p = bg + alpha * (c - bg) of the background with
   a palette colour c, which is exactly what an anti-aliased edge is. bg is the image's own background:
   the median of its outermost pixel ring (objects stay off the border), unless that is implausible
   (farther than BG_MAX_SHIFT from the nominal white, or within BG_MIN_CONTRAST of a palette colour:
   a flood, a black image), in which case the nominal BACKGROUND is used. For every colour we take the
   best alpha in [0, 1] and the residual distance; the pixel gets the colour of least residual if that
   residual is below `MAX_RESIDUAL` (else it is nothing: black, grey, brown, noise). Pixels with
   alpha >= 0.5 are the object's core, lighter ones only its edge.
3. Components. 4-connected components of core pixels of one colour, by min-label propagation with
   pointer jumping over the whole batch at once. Edge pixels then join an adjacent component of their
   colour, so that the mass (sum of alpha) is the object's true area at sub-pixel precision. Components
   lighter than MIN_AREA_FRAC of the canvas are noise; heavier than MAX_AREA_FRAC are not objects (a
   flood of one colour), both are dropped.
4. Shape, from alpha-weighted complex moments about the centroid (z = dx + i dy): the 3-fold harmonic
   |sum z^3| is large only for triangles, the 4-fold |sum z^4| only for squares, a circle has neither.
   Both are scale invariant and, unlike bounding-box fill ratios, do not depend on where the pixel
   grid cuts the edges. A component too spread out for its area (`SPREAD_MAX`: fragments, rings,
   bars) is detected with shape "other", which no prompt names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .spec import BACKGROUND, COLOURS, PALETTE

__all__ = ["Detection", "WORK_SIZE", "detect", "detect_batch", "estimate_background", "to_work_array"]

WORK_SIZE = 32
MAX_RESIDUAL = 60.0  # RGB distance (0..255) from the nearest colour-background blend
EDGE_MIN_ALPHA = 0.05  # lighter edge pixels are background
BG_MAX_SHIFT = 100.0  # a border median farther than this from BACKGROUND is not a background
BG_MIN_CONTRAST = 100.0  # ... nor one this close to a palette colour
MIN_AREA_FRAC = 8.0 / 1024.0  # 8 px at 32: the smallest object (7 px triangle) has 21
MAX_AREA_FRAC = 0.3  # the largest object (12 px square) covers 0.14
# Shape thresholds on the normalised harmonics t3 = |sum z^3| / (A r^3), t4 = |sum z^4| / (A r^4) with
# r^2 = I2 / A. Measured on 3,000 32-px renders (7-12 px objects): triangle t3 0.69-0.78, square t4
# 0.54-0.60, and every other value 0.00-0.07; thresholds sit in the middle of the gaps. The spread
# I2 / A^2 is 0.16 (circle), 0.17 (square), 0.20 (triangle), 0.28 for a 3:1 bar, over 0.3 for rings and
# scattered fragments; heavy pixel noise (sigma 25 at 32 px) lifts a small triangle to ~0.27.
T3_TRIANGLE = 0.35
T4_SQUARE = 0.25
SPREAD_MAX = 0.3

_BG = np.asarray(BACKGROUND, dtype=np.float32)
_COLOURS_RGB = np.asarray([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [K, 3]


@dataclass(frozen=True)
class Detection:
    """One detected object; coordinates are fractions of the canvas side (0..1, x right, y down)."""

    colour: str
    shape: str
    cx: float
    cy: float
    width: float  # extent of the core pixels' bounding box
    height: float
    area: float  # alpha mass, as a fraction of the canvas
    features: tuple[float, float, float]  # (spread, t3, t4), for diagnostics

    def to_dict(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "cx": round(self.cx, 4),
            "cy": round(self.cy, 4),
            "width": round(self.width, 4),
            "height": round(self.height, 4),
            "area": round(self.area, 5),
        }


def _pad_square(arr: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] -> [B, S, S, 3], S = max(H, W): centred, padded with each image's border median.

    Squashing a non-square image to a square would turn circles into ellipses; padding keeps shapes.
    """
    b, h, w, _ = arr.shape
    if h == w:
        return arr
    ring = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1)
    fill = np.median(ring, axis=1).astype(np.float32)  # [B, 3]
    s = max(h, w)
    out = np.broadcast_to(fill[:, None, None, :], (b, s, s, 3)).copy()
    y0, x0 = (s - h) // 2, (s - w) // 2
    out[:, y0 : y0 + h, x0 : x0 + w] = arr
    return out


def _box_resize(arr: np.ndarray, size: int) -> np.ndarray:
    """[B, H, W, 3] float -> [B, size, size, 3] (padded square first) by exact block means, or PIL's
    BOX filter when the side is not a multiple of `size`."""
    arr = _pad_square(arr)
    b, h, w, _ = arr.shape
    if (h, w) == (size, size):
        return arr
    if h % size == 0 and w % size == 0:
        return arr.reshape(b, size, h // size, size, w // size, 3).mean(axis=(2, 4))
    out = np.empty((b, size, size, 3), dtype=np.float32)
    for i in range(b):
        for ch in range(3):
            img = Image.fromarray(np.ascontiguousarray(arr[i, :, :, ch], dtype=np.float32), mode="F")
            out[i, :, :, ch] = np.asarray(img.resize((size, size), Image.Resampling.BOX))
    return out


def to_work_array(images: Sequence[Image.Image] | np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """PIL images (any sizes) or an array [B, H, W, 3] in 0..255 -> float32 [B, size, size, 3]."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected an array [B, H, W, 3], got shape {images.shape}")
        return _box_resize(images.astype(np.float32, copy=False), size)
    out = np.empty((len(images), size, size, 3), dtype=np.float32)
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"image {i}: expected a PIL image, got {type(im).__name__}")
        a = np.asarray(im.convert("RGB"), dtype=np.float32)[None]
        out[i] = _box_resize(a, size)[0]
    return out


def estimate_background(arr: np.ndarray) -> np.ndarray:
    """Per-image background [B, 3]: median of the outermost pixel ring, or BACKGROUND if implausible."""
    ring = np.concatenate([arr[:, 0], arr[:, -1], arr[:, 1:-1, 0], arr[:, 1:-1, -1]], axis=1)  # [B, R, 3]
    bg = np.median(ring, axis=1).astype(np.float32)
    shift = np.linalg.norm(bg - _BG, axis=1)
    contrast = np.linalg.norm(bg[:, None, :] - _COLOURS_RGB[None], axis=2).min(axis=1)
    bad = (shift > BG_MAX_SHIFT) | (contrast < BG_MIN_CONTRAST)
    bg[bad] = _BG
    return bg


def _classify_pixels(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, H, W, 3] -> (colour index or -1 [B, H, W], alpha [B, H, W]) under the blend model."""
    b = arr.shape[0]
    bg = estimate_background(arr)  # [B, 3]
    dirs = _COLOURS_RGB[None] - bg[:, None, :]  # [B, K, 3]
    norm2 = (dirs**2).sum(axis=2)[:, None, :]  # [B, 1, K]
    p = arr.reshape(b, -1, 3) - bg[:, None, :]  # [B, HW, 3]
    dots = np.einsum("bnc,bkc->bnk", p, dirs)  # [B, HW, K]
    alpha = np.clip(dots / norm2, 0.0, 1.0)
    resid2 = (p**2).sum(axis=2, keepdims=True) - 2.0 * alpha * dots + alpha**2 * norm2
    best = resid2.argmin(axis=2)[..., None]
    a = np.take_along_axis(alpha, best, axis=2)[..., 0]
    r2 = np.take_along_axis(resid2, best, axis=2)[..., 0]
    ok = (r2 < MAX_RESIDUAL**2) & (a >= EDGE_MIN_ALPHA)
    colour = np.where(ok, best[..., 0], -1).reshape(arr.shape[:3])
    return colour, np.where(ok, a, 0.0).reshape(arr.shape[:3]).astype(np.float32)


def _label(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal positive values in a zero-padded [B, Hp, Wp] int array.

    Returns, per pixel, the flat index of its component's root (the component's smallest index);
    pixels with cls == 0 point at themselves.
    """
    wp = cls.shape[2]
    flat = cls.ravel()
    idx = np.arange(flat.size, dtype=np.int64)
    lab = idx.copy()
    fg = np.flatnonzero(flat > 0)
    neighbours = []
    for off in (1, -1, wp, -wp):
        nb = fg + off  # padding keeps fg neighbours inside the array and inside their own image
        keep = flat[nb] == flat[fg]
        neighbours.append((fg[keep], nb[keep]))
    while True:
        old = lab[fg].copy()
        for src, nb in neighbours:
            cand = lab[nb]
            cur = lab[src]
            better = cand < cur
            lab[src[better]] = cand[better]
        for _ in range(3):  # pointer jumping: follow roots of roots
            lab[fg] = lab[lab[fg]]
        if np.array_equal(lab[fg], old):
            return lab


def detect_batch(arr: np.ndarray) -> list[list[Detection]]:
    """Detect objects in a float array [B, H, W, 3] (0..255) already at working resolution.

    Returns one list per image, largest object first.
    """
    b, h, w, _ = arr.shape
    colour, alpha = _classify_pixels(arr)
    core = (colour >= 0) & (alpha >= 0.5)
    hp, wp = h + 2, w + 2
    cls = np.zeros((b, hp, wp), dtype=np.int16)
    cls[:, 1:-1, 1:-1] = np.where(core, colour + 1, 0)
    lab = _label(cls)

    # Edge pixels (0 < alpha < 0.5, a colour) join a 8-neighbouring core component of their colour.
    col_p = np.zeros((b, hp, wp), dtype=np.int16)
    col_p[:, 1:-1, 1:-1] = colour + 1
    alpha_p = np.zeros((b, hp, wp), dtype=np.float32)
    alpha_p[:, 1:-1, 1:-1] = alpha
    flat_cls, flat_col, flat_alpha = cls.ravel(), col_p.ravel(), alpha_p.ravel()
    edge = np.flatnonzero((flat_cls == 0) & (flat_col > 0))
    edge_lab = np.full(edge.size, -1, dtype=np.int64)
    for off in (1, -1, wp, -wp, wp + 1, wp - 1, -wp + 1, -wp - 1):
        nb = edge + off
        ok = (flat_cls[nb] == flat_col[edge]) & (edge_lab < 0)
        edge_lab[ok] = lab[nb[ok]]
    core_idx = np.flatnonzero(flat_cls > 0)
    members = np.concatenate([core_idx, edge[edge_lab >= 0]])
    roots = np.concatenate([lab[core_idx], edge_lab[edge_lab >= 0]])
    results: list[list[Detection]] = [[] for _ in range(b)]
    if members.size == 0:
        return results
    uniq, comp = np.unique(roots, return_inverse=True)
    m = uniq.size
    wts = flat_alpha[members].astype(np.float64)
    img_i, rem = np.divmod(members, hp * wp)
    yy, xx = np.divmod(rem, wp)
    x = xx - 1 + 0.5  # pixel centres in working pixels
    y = yy - 1 + 0.5
    mass = np.bincount(comp, wts, m)
    cx = np.bincount(comp, wts * x, m) / mass
    cy = np.bincount(comp, wts * y, m) / mass
    z = (x - cx[comp]) + 1j * (y - cy[comp])
    z2 = z * z
    i2 = np.bincount(comp, wts * (z * z.conjugate()).real, m) + mass / 6.0  # + in-pixel variance
    c3 = np.bincount(comp, wts * (z2 * z).real, m) + 1j * np.bincount(comp, wts * (z2 * z).imag, m)
    c4 = np.bincount(comp, wts * (z2 * z2).real, m) + 1j * np.bincount(comp, wts * (z2 * z2).imag, m)
    r2 = i2 / mass
    spread = i2 / mass**2
    t3 = np.abs(c3) / (mass * r2**1.5)
    t4 = np.abs(c4) / (mass * r2**2)

    is_core = np.zeros(members.size, dtype=bool)
    is_core[: core_idx.size] = True
    big = np.iinfo(np.int64).max
    x0 = np.full(m, big)
    y0 = np.full(m, big)
    x1 = np.full(m, -1)
    y1 = np.full(m, -1)
    cc, cxx, cyy = comp[is_core], xx[is_core], yy[is_core]
    np.minimum.at(x0, cc, cxx)
    np.minimum.at(y0, cc, cyy)
    np.maximum.at(x1, cc, cxx)
    np.maximum.at(y1, cc, cyy)
    comp_img = np.empty(m, dtype=np.int64)
    comp_img[comp] = img_i
    comp_col = np.empty(m, dtype=np.int64)
    comp_col[comp] = flat_col[members] - 1

    canvas = float(h * w)
    for k in np.argsort(-mass, kind="stable"):
        frac = mass[k] / canvas
        if frac < MIN_AREA_FRAC or frac > MAX_AREA_FRAC:
            continue
        if spread[k] > SPREAD_MAX:
            shape = "other"
        elif t3[k] > T3_TRIANGLE and t3[k] >= t4[k]:
            shape = "triangle"
        elif t4[k] > T4_SQUARE:
            shape = "square"
        else:
            shape = "circle"
        results[int(comp_img[k])].append(
            Detection(
                colour=COLOURS[int(comp_col[k])],
                shape=shape,
                cx=float(cx[k]) / w,
                cy=float(cy[k]) / h,
                width=float(x1[k] - x0[k] + 1) / w,
                height=float(y1[k] - y0[k] + 1) / h,
                area=float(frac),
                features=(float(spread[k]), float(t3[k]), float(t4[k])),
            )
        )
    return results


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Detect the objects in one PIL image (any size) or [H, W, 3] array (0..255), largest first."""
    arr = image[None] if isinstance(image, np.ndarray) else [image]
    return detect_batch(to_work_array(arr))[0]
