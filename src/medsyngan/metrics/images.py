"""Reading the image sets an evaluation compares: a prepared dataset directory or a folder of image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medsyngan.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 [N, S, S]
    patients: np.ndarray | None  # patient id per image, when known
    source: str
    # a prepared dataset's findings (a tuple per image), views and sexes: what utility's classifiers learn
    labels: list[tuple[str, ...]] | None = None
    views: np.ndarray | None = None
    sexes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


def read_image_folder(folder: Path) -> np.ndarray:
    """The images of a folder as uint8 [N, S, S] greyscale, in file-name order; all must share one square size."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder; point to a folder of images")
    first_shape = None
    out = []
    for path in files:
        try:
            with Image.open(path) as img:
                arr = np.asarray(img.convert("L"))
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"{path}: unreadable image ({exc}); remove or replace it") from None
        if first_shape is None:
            first_shape = arr.shape
            if arr.shape[0] != arr.shape[1]:
                raise UserError(f"{path}: {arr.shape[1]}×{arr.shape[0]} is not square; prepare the images first")
        elif arr.shape != first_shape:
            raise UserError(
                f"{path}: {arr.shape[1]}×{arr.shape[0]} differs from {first_shape[1]}×{first_shape[0]} of "
                f"{files[0].name}; all images of a set must share one resolution"
            )
        out.append(arr)
    return np.stack(out)


def load_image_set(path: str | Path, role: str = "images") -> ImageSet:
    """``path``: a prepared dataset (has manifest.json) or a folder of greyscale/RGB images of one size."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{role} {root} does not exist; give a prepared dataset or a folder of images")
    if root.is_dir() and (root / "manifest.json").is_file():
        from medsyngan.data.prepared import PreparedDataset

        ds = PreparedDataset.open(root)
        if len(ds) == 0:
            raise UserError(f"{role} {root}: the prepared dataset holds no images")
        return ImageSet(ds.images, np.asarray(ds.patients), str(root), ds.labels, ds.views, ds.sexes)
    if not root.is_dir():
        raise UserError(f"{role} {root} is not a folder; give a prepared dataset or a folder of images")
    return ImageSet(read_image_folder(root), None, str(root))


def check_same_resolution(**sets: np.ndarray | None) -> int:
    """All given sets share one square resolution; returns it."""
    sizes = {name: arr.shape[1:] for name, arr in sets.items() if arr is not None}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {s[0]}×{s[1]}" for name, s in sizes.items())
        raise UserError(f"image sets differ in resolution ({listed}); prepare them at one size")
    for name, arr in sets.items():
        if arr is not None and (arr.ndim != 3 or arr.dtype != np.uint8):
            raise UserError(f"{name} images must be uint8 [N, S, S]; got {arr.dtype} {tuple(arr.shape)}")
    return int(next(iter(sizes.values()))[-1])
