"""Pixel operations of `prepare`: square the image (centre crop or pad), antialiased resize, equalization."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

EQUALIZE = ("none", "hist", "clahe")
ASPECT = ("crop", "pad")


def square(img: np.ndarray, aspect: str) -> np.ndarray:
    """Centre-crop to the short side, or pad with black to the long side (X-ray surroundings are dark)."""
    h, w = img.shape
    if h == w:
        return img
    if aspect == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return img[top : top + s, left : left + s]
    s = max(h, w)
    out = np.zeros((s, s), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Lanczos with PIL's antialiasing support (the filter widens when shrinking), so no aliasing on 1024→64."""
    if img.shape == (size, size):
        return img
    out = Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(out)


def equalize_hist(img: np.ndarray) -> np.ndarray:
    hist = np.bincount(img.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    lo = cdf[np.flatnonzero(hist)[0]]
    if cdf[-1] == lo:
        return img.copy()
    lut = np.round((cdf - lo) / (cdf[-1] - lo) * 255.0).clip(0, 255).astype(np.uint8)
    return lut[img]


def clahe(img: np.ndarray, tiles: int = 8, clip_limit: float = 0.01) -> np.ndarray:
    """Contrast-limited adaptive histogram equalization (Zuiderveld 1994).

    Per tile: histogram clipped at clip_limit × pixels per tile, the excess spread evenly, CDF as a mapping;
    each pixel blends the mappings of the four nearest tile centres bilinearly.
    """
    h, w = img.shape
    th, tw = math.ceil(h / tiles), math.ceil(w / tiles)
    padded = np.pad(img, ((0, tiles * th - h), (0, tiles * tw - w)), mode="reflect")
    blocks = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    offsets = (np.arange(tiles * tiles) * 256)[:, None]
    hist = np.bincount((blocks.astype(np.int64) + offsets).ravel(), minlength=tiles * tiles * 256)
    hist = hist.reshape(tiles * tiles, 256).astype(np.float64)
    limit = max(1.0, clip_limit * th * tw)
    excess = np.clip(hist - limit, 0, None).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / 256.0
    cdf = np.cumsum(hist, axis=1)
    lut = (cdf / cdf[:, -1:] * 255.0).reshape(tiles, tiles, 256)

    def axis(n: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = np.clip((np.arange(n) + 0.5) / t - 0.5, 0, tiles - 1)
        i0 = np.floor(f).astype(np.int64)
        i1 = np.minimum(i0 + 1, tiles - 1)
        return i0, i1, (f - i0)

    y0, y1, wy = axis(h, th)
    x0, x1, wx = axis(w, tw)
    y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]
    out = (
        (1 - wy) * ((1 - wx) * lut[y0, x0, img] + wx * lut[y0, x1, img])
        + wy * ((1 - wx) * lut[y1, x0, img] + wx * lut[y1, x1, img])
    )
    return np.round(out).clip(0, 255).astype(np.uint8)


def process(img: np.ndarray, size: int, aspect: str, equalize: str) -> np.ndarray:
    out = resize(square(img, aspect), size)
    if equalize == "hist":
        out = equalize_hist(out)
    elif equalize == "clahe":
        out = clahe(out)
    return np.ascontiguousarray(out, dtype=np.uint8)
