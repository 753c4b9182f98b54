"""Per-image statistics that reward hacking moves: brightness, saturation, colour entropy, grid energy, JPEG size.

Why these: they are the symptoms users of image-RL trainers report when a reward is being hacked, long before
anyone looks at the images: images drifting brighter (DiffusionNFT#47), a run that erased backgrounds into flat
colour (UniRL#407: colour entropy down 54%), grid artifacts at the token grid within a few epochs (flow_grpo#233),
and the loss or gain of detail that JPEG size tracks. The reward-hacking monitors (`margrpo.rl.monitors`) compare
them between each in-loop evaluation and step 0.

Every statistic is computed on the 8-bit RGB picture a user sees (the [-1, 1] floats rounded as `to_pil` rounds
them), one value per image:

- `brightness`: mean Rec. 601 luma (0.299 R + 0.587 G + 0.114 B) / 255, in [0, 1];
- `saturation`: mean HSV saturation (max - min) / max over R, G, B per pixel (0 for black pixels), in [0, 1];
- `colour_entropy`: Shannon entropy in bits of the image's colour histogram, each channel quantised to 8 levels
  (its top 3 bits: 512 colour bins), in [0, 9]; a solid colour has 0;
- `grid_energy`: the share of the image's variance (summed over R, G, B) in its component that repeats with the
  token period p, in [0, 1]; see `grid_energy`;
- `jpeg_bpp`: bits per pixel of the image saved as JPEG at quality 95 (DDPO's compressibility measure, per pixel
  so that it does not depend on the resolution).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

__all__ = ["STATISTICS", "image_statistics", "jpeg_size_kb", "grid_energy", "to_uint8"]

STATISTICS = ("brightness", "saturation", "colour_entropy", "grid_energy", "jpeg_bpp")


def jpeg_size_kb(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of ``image`` encoded as RGB JPEG at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] floats in [-1, 1] -> [N, H, W, 3] uint8, rounded as `margrpo.utils.images.to_pil` rounds."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"image statistics need [N, 3, H, W] RGB images, got shape {tuple(images.shape)}")
    x = torch.nan_to_num(images.detach().to("cpu", torch.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_energy(pixels: np.ndarray, period: int) -> np.ndarray:
    """Per image, the share of its variance in the component that repeats every `period` pixels in x and in y.

    The periodic component is the mean tile: every pixel replaced by the mean over all `period` x `period` tiles
    of the pixel at the same position within its tile. It is the image's projection onto the patterns of that
    period, i.e. its Fourier components at the harmonics of the token-grid frequency, so the share is the spectral
    energy at the patch-grid frequencies over all non-constant energy.

    Why this measure: a grid artifact is the same thing printed into every token, a seam along token borders or a
    texture inside each token; both survive averaging over tiles, while image content, which is not aligned to the
    token grid, averages out (white noise keeps (p^2 - 1) / (HW - 1) of its energy). A brightness or contrast
    change leaves the share unchanged. It is specific to the token period: a pattern of twice the period (a
    checkerboard of token-sized cells) averages to a flat tile and scores 0. Images are cropped to a multiple of
    the period; a flat image (no variance) scores 0.
    """
    if period < 1:
        raise ValueError(f"grid_energy: the period must be >= 1 pixel, got {period}")
    n, h, w, c = pixels.shape
    hc, wc = h - h % period, w - w % period
    if hc == 0 or wc == 0:
        raise ValueError(f"grid_energy: images of {h} x {w} pixels hold no whole {period}-pixel tile")
    x = pixels[:, :hc, :wc].astype(np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    tile = x.reshape(n, hc // period, period, wc // period, period, c).mean(axis=(1, 3))
    periodic = (tile**2).sum(axis=(1, 2, 3)) * (hc // period) * (wc // period)
    total = (x**2).sum(axis=(1, 2, 3))
    return np.divide(periodic, total, out=np.zeros(n), where=total > 0)


def _colour_entropy(pixels: np.ndarray) -> np.ndarray:
    q = pixels.astype(np.int64) >> 5  # 8 levels per channel
    bins = (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).reshape(len(pixels), -1)
    out = np.empty(len(pixels))
    for i, b in enumerate(bins):
        p = np.bincount(b, minlength=512) / b.size
        p = p[p > 0]
        out[i] = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: a solid colour gives 0.0, not -0.0
    return out


def image_statistics(images: torch.Tensor, period: int) -> dict[str, np.ndarray]:
    """Every statistic of `STATISTICS` for each image of [N, 3, H, W] floats in [-1, 1]: name -> float64 [N].

    `period` is the token period in pixels (the side of the image area one token decodes to), for `grid_energy`.
    """
    pixels = to_uint8(images)
    rgb = pixels.astype(np.float64) / 255.0
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.divide(top - bottom, top, out=np.zeros_like(top), where=top > 0)
    h, w = pixels.shape[1:3]
    return {
        "brightness": (rgb @ np.array([0.299, 0.587, 0.114])).mean(axis=(1, 2)),
        "saturation": saturation.mean(axis=(1, 2)),
        "colour_entropy": _colour_entropy(pixels),
        "grid_energy": grid_energy(pixels, period),
        "jpeg_bpp": np.array([jpeg_size_kb(Image.fromarray(p)) * 8000 / (h * w) for p in pixels]),
    }
