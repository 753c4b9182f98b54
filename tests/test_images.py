"""Tensor <-> PIL conversions, grids with captions, atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from margrpo.utils.images import from_pil, make_grid, save_png, side_by_side, to_pil

torch.set_num_threads(1)


def _images(n: int = 3, size: int = 8) -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return to_pil(x)


def test_roundtrip_exact_on_uint8() -> None:
    u8 = torch.randint(0, 256, (4, 3, 5, 7), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    pil = [Image.fromarray(a) for a in u8.permute(0, 2, 3, 1).numpy()]
    x = from_pil(pil)
    assert x.shape == (4, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    back = to_pil(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pil, back, strict=True))


def test_to_pil_values_and_shapes() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    (im,) = to_pil(x)
    assert im.mode == "RGB" and im.size == (4, 1)
    assert np.asarray(im)[0, :, 0].tolist() == [0, 128, 255, 255]  # clamped
    assert to_pil(torch.zeros(3, 2, 2))[0].size == (2, 2)  # unbatched
    assert to_pil(torch.zeros(2, 1, 2, 2))[0].mode == "L"
    with pytest.warns(UserWarning, match="non-finite"):
        (im,) = to_pil(torch.full((1, 3, 2, 2), float("nan")))
    assert np.asarray(im).max() == 128
    with pytest.raises(ValueError, match="got shape"):
        to_pil(torch.zeros(2, 4, 2, 2))
    with pytest.raises(ValueError, match="image 1 has size"):
        from_pil([Image.new("RGB", (2, 2)), Image.new("RGB", (3, 2))])


def test_grid_layout_and_nearest_upscale() -> None:
    ims = _images(5, size=8)
    grid = make_grid(ims, nrow=3, upscale=4, padding=2)
    assert grid.size == (3 * 32 + 4 * 2, 2 * 32 + 3 * 2)
    # nearest-neighbour: each source pixel becomes a 4x4 block of exactly that colour
    cell = np.asarray(grid)[2:34, 2:34]
    src = np.asarray(ims[0])
    assert np.array_equal(cell, np.repeat(np.repeat(src, 4, axis=0), 4, axis=1))
    # the 6th cell is empty background
    assert (np.asarray(grid)[2 + 34 : 2 + 34 + 32, 2 + 2 * 34 : 2 + 2 * 34 + 32] == 255).all()


def test_grid_captions_wrap() -> None:
    ims = _images(2, size=8)
    plain = make_grid(ims, nrow=2, upscale=4)
    short = make_grid(ims, nrow=2, upscale=4, labels=["a", "b"])
    long = make_grid(ims, nrow=2, upscale=4, labels=["a red circle left of a blue square", "b"])
    capped = make_grid(ims, nrow=2, upscale=4, labels=["word " * 50, "b"], max_label_lines=2)
    assert plain.width == short.width == long.width  # captions never widen cells
    assert plain.height < short.height < long.height
    two_lines = make_grid(ims, nrow=2, upscale=4, labels=["x\ny", "b"])
    assert capped.height == two_lines.height  # 50 words cut to 2 lines (the last ends in "...")
    # caption pixels are drawn (not just blank space) below the first cell
    below = np.asarray(short)[2 + 32 :, 2 : 2 + 32]
    assert (below < 128).any()
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        make_grid(ims, labels=["x"])


def test_side_by_side() -> None:
    a = Image.new("RGB", (10, 20), (255, 0, 0))
    b = Image.new("RGB", (30, 10), (0, 0, 255))
    out = side_by_side(a, b, gap=4)
    assert out.size == (44, 20)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((14, 0)) == (0, 0, 255)
    titled = side_by_side(a, b, titles=("before", "after"), gap=4)
    assert titled.width == 44 and titled.height > 20


def test_save_png_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    im = _images(1)[0]
    p = save_png(im, tmp_path / "samples" / "step-1.png")
    with Image.open(p) as back:
        assert np.array_equal(np.asarray(back), np.asarray(im))

    def broken_save(self: Image.Image, fp: object, format: str | None = None, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        save_png(Image.new("RGB", (2, 2)), p)
    monkeypatch.undo()
    with Image.open(p) as back:  # old file intact, no temp files left
        assert np.array_equal(np.asarray(back), np.asarray(im))
    assert [q.name for q in p.parent.iterdir()] == ["step-1.png"]
