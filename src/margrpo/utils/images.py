"""Image conversions and sample grids.

Models work on float tensors in [-1, 1], ``[B, 3, H, W]``; rewards, grids and files want PIL
images. The two conversions here are exact inverses on uint8 data, so a reward that decodes a
PNG sees exactly what the sampler produced. Grids upscale with nearest-neighbour because the
embedded world's images are 32 px: any smoothing would blur the very artefacts (fragmented
shapes, salt-and-pepper noise) that a sample grid exists to show.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from margrpo.utils.atomic import atomic_write

__all__ = ["to_pil", "from_pil", "make_grid", "side_by_side", "save_png"]

Color = tuple[int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, C, H, W]`` (or ``[C, H, W]``) floats in [-1, 1] -> list of RGB (C=3) or L (C=1) images.

    Values are clamped; nan/inf are replaced by 0 (mid-grey) with a warning, so that logging a
    diverged sample never crashes a run.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_pil expects a tensor, got {type(images).__name__}")
    x = images.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_pil expects [B, 3, H, W] or [B, 1, H, W], got shape {tuple(images.shape)}")
    x = x.to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(x).all():
        warnings.warn("to_pil: non-finite pixel values replaced by 0", stacklevel=2)
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]


def from_pil(images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
    """List of PIL images (converted to RGB, all the same size) -> float32 ``[B, 3, H, W]`` in [-1, 1]."""
    if isinstance(images, Image.Image):
        images = [images]
    if len(images) == 0:
        raise ValueError("from_pil: empty image list")
    size = images[0].size
    arrs = []
    for i, im in enumerate(images):
        if im.size != size:
            raise ValueError(f"from_pil: image {i} has size {im.size}, image 0 has {size}; resize them first")
        arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(torch.float32)
    return (t / 127.5 - 1.0).contiguous()


# --------------------------------------------------------------------------------------------
# Text helpers.


def _font() -> Font:
    return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ahgjy|")[3]) + 2


def _text_width(font: Font, text: str) -> float:
    return float(font.getlength(text))


def _wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; over-long words are split; at most ``max_lines`` lines."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split():
            cand = f"{cur} {word}" if cur else word
            if _text_width(font, cand) <= width:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = ""
            while _text_width(font, word) > width and len(word) > 1:  # split a word wider than the cell
                n = len(word) - 1
                while n > 1 and _text_width(font, word[:n]) > width:
                    n -= 1
                lines.append(word[:n])
                word = word[n:]
            cur = word
        lines.append(cur)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _upscale(im: Image.Image, factor: int) -> Image.Image:
    if factor == 1:
        return im
    return im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)


# --------------------------------------------------------------------------------------------
# Compositions.


def make_grid(
    images: Sequence[Image.Image],
    nrow: int = 8,
    labels: Sequence[str] | None = None,
    upscale: int = 1,
    padding: int = 2,
    background: Color = (255, 255, 255),
    text_color: Color = (0, 0, 0),
    max_label_lines: int = 4,
) -> Image.Image:
    """Tile ``images`` into a grid with ``nrow`` images per row (torchvision's convention).

    Each image is upscaled ``upscale``x with nearest-neighbour. With ``labels`` (one per image), a
    caption in PIL's default font is wrapped to the cell width under each cell (at most
    ``max_label_lines`` lines, then "..."). Cells are as large as the largest image.
    """
    if len(images) == 0:
        raise ValueError("make_grid: no images")
    if nrow < 1 or upscale < 1 or padding < 0:
        raise ValueError(
            f"make_grid: need nrow >= 1, upscale >= 1, padding >= 0 (got {nrow}, {upscale}, {padding})"
        )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"make_grid: {len(labels)} labels for {len(images)} images")
    cells = [_upscale(im.convert("RGB"), upscale) for im in images]
    cw = max(c.width for c in cells)
    ch = max(c.height for c in cells)
    ncols = min(nrow, len(cells))
    nrows = math.ceil(len(cells) / ncols)

    font = _font()
    wrapped: list[list[str]] = []
    cap_h = 0
    if labels is not None:
        wrapped = [_wrap(str(t), font, cw, max_label_lines) for t in labels]
        n_lines = max((len(w) for w in wrapped), default=0)
        cap_h = n_lines * _line_height(font) + (2 if n_lines else 0)

    width = ncols * cw + (ncols + 1) * padding
    height = nrows * (ch + cap_h) + (nrows + 1) * padding
    grid = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(grid)
    lh = _line_height(font)
    for i, cell in enumerate(cells):
        r, c = divmod(i, ncols)
        x = padding + c * (cw + padding)
        y = padding + r * (ch + cap_h + padding)
        grid.paste(cell, (x, y))
        if wrapped:
            for j, line in enumerate(wrapped[i]):
                draw.text((x, y + ch + 1 + j * lh), line, fill=text_color, font=font)
    return grid


def side_by_side(
    left: Image.Image,
    right: Image.Image,
    titles: Sequence[str] | None = None,
    gap: int = 8,
    background: Color = (255, 255, 255),
    text_color: Color = (0, 0, 0),
) -> Image.Image:
    """Two images next to each other (e.g. before/after RL grids), with optional titles above each."""
    if titles is not None and len(titles) != 2:
        raise ValueError(f"side_by_side: expected 2 titles, got {len(titles)}")
    left = left.convert("RGB")
    right = right.convert("RGB")
    font = _font()
    lh = _line_height(font)
    wrapped: list[list[str]] = []
    if titles:
        wrapped = [_wrap(str(t), font, im.width, 3) for t, im in zip(titles, (left, right), strict=True)]
    title_h = (max(len(w) for w in wrapped) * lh + 4) if wrapped else 0
    width = left.width + gap + right.width
    height = title_h + max(left.height, right.height)
    out = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(out)
    for k, (im, x) in enumerate(((left, 0), (right, left.width + gap))):
        out.paste(im, (x, title_h))
        if wrapped:
            for j, line in enumerate(wrapped[k]):
                draw.text((x, 2 + j * lh), line, fill=text_color, font=font)
    return out


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` as PNG atomically (temp file in the same folder + ``os.replace``); returns the path.

    A viewer or a sync job never sees a half-written file, and a crash leaves the old one.
    """
    return atomic_write(path, lambda f: img.save(f, format="PNG"), binary=True)
