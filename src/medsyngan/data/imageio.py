"""Decode one chest X-ray file (PNG, JPEG, DICOM) into an 8-bit greyscale array.

Every failure is a ``BadImage`` naming the file and what is wrong; ``prepare`` turns it into a one-line
UserError, or into an entry of the skipped list when the user asked to skip bad files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES
MIN_SIDE = 16
MAX_ASPECT = 3.0
# Mean absolute channel difference (0..255) above which an RGB file is a colour picture, not a grey radiograph.
MAX_COLOUR = 6.0


class BadImage(Exception):
    """A file that cannot become a greyscale chest X-ray; the message is 'what is wrong' (the caller adds the path)."""


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear min–max rescale of a high-bit-depth array to 0..255 (a constant image becomes 0)."""
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                arr = np.asarray(im)
            elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = minmax_to_uint8(np.asarray(im))
            elif mode in ("RGB", "RGBA", "LA", "P", "1"):
                if mode == "P":
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                    mode = im.mode
                rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
                if mode in ("RGB", "RGBA"):
                    spread = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])).mean() / 2
                    if spread > MAX_COLOUR:
                        raise BadImage(f"colour image (mean channel difference {spread:.1f}), not a greyscale X-ray")
                arr = np.asarray(im.convert("L"))
            else:
                raise BadImage(f"unsupported image mode {mode}; convert it to 8-bit greyscale")
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadImage(f"unreadable or truncated image ({exc})") from None
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_dicom(path: Path) -> np.ndarray:
    """Pixel data with the modality LUT (rescale slope/intercept) and VOI window applied; MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except InvalidDicomError as exc:
        raise BadImage(f"not a DICOM file ({exc})") from None
    except Exception as exc:  # pydicom raises many types for missing tags, codecs and truncation
        raise BadImage(f"unreadable DICOM ({type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImage(f"DICOM photometric interpretation {photometric}; only greyscale radiographs are supported")
    if pixels.ndim != 2:
        raise BadImage(f"DICOM pixel data has shape {pixels.shape}; expected one 2-D frame")
    try:
        values = apply_modality_lut(pixels, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            values = apply_voi_lut(values, ds)
    except Exception as exc:
        raise BadImage(f"DICOM rescale/window could not be applied ({exc})") from None
    out = minmax_to_uint8(np.asarray(values))
    return 255 - out if photometric == "MONOCHROME1" else out


def read_grey(path: Path) -> np.ndarray:
    """uint8 [H, W] of a PNG, JPEG or DICOM file; raises BadImage for anything that is not a usable X-ray."""
    path = Path(path)
    if not path.is_file():
        raise BadImage("file not found")
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in RASTER_SUFFIXES and _looks_like_dicom(path)):
        arr = read_dicom(path)
    else:
        arr = read_raster(path)
    h, w = arr.shape
    if min(h, w) < MIN_SIDE or max(h, w) / min(h, w) > MAX_ASPECT:
        raise BadImage(f"unexpected size {w}x{h} (need sides ≥ {MIN_SIDE} px and aspect ≤ {MAX_ASPECT:g}:1)")
    return arr


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, S, S] (or a list of S×S arrays) → one uint8 grid image, ``cols`` wide (default square-ish),
    with black padding; the one tiling used by phantom previews, training samples and reports."""
    images = np.asarray(images)
    n, s = images.shape[0], images.shape[1]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (s + pad) + pad, cols * (s + pad) + pad), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (s + pad): pad + r * (s + pad) + s, pad + c * (s + pad): pad + c * (s + pad) + s] = img
    return grid
