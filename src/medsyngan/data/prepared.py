"""A prepared dataset on disk and its reader.

Layout of a prepared dataset directory::

    DIR/
      images.u8       N × S × S uint8, C order, no header (memory-mapped for training)
      index.csv       image,patient,labels,view,split,sex,age  — one row per image, in the order of images.u8
      manifest.json   format, count, size, settings, inputs hash, skipped files

``labels`` in the index is ``|``-separated like the NIH release, with ``No Finding`` for an image without
findings; in memory an image without findings has the empty tuple. ``sex`` is M, F or empty and ``age`` whole
years or empty (unknown); an index written before these columns existed opens with every sex and age unknown.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medsyngan.errors import UserError

FORMAT_VERSION = 1
IMAGES_FILE = "images.u8"
INDEX_FILE = "index.csv"
MANIFEST_FILE = "manifest.json"
INDEX_COLUMNS = ("image", "patient", "labels", "view", "split")
DEMOGRAPHIC_COLUMNS = ("sex", "age")  # optional when reading
NO_FINDING = "No Finding"
UNKNOWN_AGE = -1


def parse_labels(text: str) -> tuple[str, ...]:
    """NIH 'Finding Labels' → sorted tuple of findings; 'No Finding' and empty → ()."""
    parts = sorted({p.strip() for p in text.split("|") if p.strip()} - {NO_FINDING})
    return tuple(parts)


def format_labels(labels: Sequence[str]) -> str:
    return "|".join(labels) if labels else NO_FINDING


def normalize_sex(text: str) -> str:
    """'M'/'F' from the spellings found in metadata (m, male, F, female, ...); '' when unknown."""
    value = text.strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(value, "")


def parse_age(text: str) -> int:
    """Age in whole years from NIH ('57', '057Y', '010M', '003D') or plain metadata; UNKNOWN_AGE when unreadable."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YyMmWwDd]?)\s*", text or "")
    if match is None:
        return UNKNOWN_AGE
    number, unit = int(match.group(1)), match.group(2).upper()
    years = number if unit in ("", "Y") else 0  # months, weeks, days: an infant
    return years if years <= 130 else UNKNOWN_AGE


@dataclass
class PreparedDataset:
    """Images (uint8 [N,S,S]) plus per-image patient, labels, view, split, sex ('M'/'F'/'') and age (years, -1
    when unknown).

    ``subset`` keeps the parent's memmap and an index array; ``images`` of a subset is a memmap slice when
    the indices are a contiguous run, and otherwise the selected rows are read once, on first access.
    """

    root: Path
    size: int
    image_names: list[str]
    patients: np.ndarray
    labels: list[tuple[str, ...]]
    views: np.ndarray
    splits: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)
    sexes: np.ndarray | None = None  # None: all unknown
    ages: np.ndarray | None = None
    _base: np.ndarray | None = field(default=None, repr=False)
    _rows: np.ndarray | None = field(default=None, repr=False)
    _images: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.image_names)
        if self.sexes is None:
            self.sexes = np.full(n, "", dtype=str)
        if self.ages is None:
            self.ages = np.full(n, UNKNOWN_AGE, dtype=np.int64)

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        root = Path(path)
        manifest_path = root / MANIFEST_FILE
        if not root.is_dir():
            raise UserError(f"{root}: prepared dataset not found; create it with `medsyngan data prepare --out {root}`")
        if not manifest_path.is_file():
            raise UserError(
                f"{root}: not a prepared dataset (no {MANIFEST_FILE}); create it with `medsyngan data prepare`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            count, size = int(manifest["count"]), int(manifest["size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(f"{manifest_path}: unreadable manifest; re-run `medsyngan data prepare`") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise UserError(
                f"{root}: prepared with format {manifest.get('format')}, this version reads {FORMAT_VERSION}; "
                "re-run `medsyngan data prepare`"
            )
        names, patients, labels, views, splits, sexes, ages = _read_index(root / INDEX_FILE)
        if len(names) != count:
            raise UserError(
                f"{root / INDEX_FILE}: {len(names)} rows but the manifest says {count}; re-run `medsyngan data prepare`"
            )
        images_path = root / IMAGES_FILE
        expected = count * size * size
        if not images_path.is_file() or images_path.stat().st_size != expected:
            raise UserError(
                f"{images_path}: missing or not {expected} bytes ({count} × {size}²); re-run `medsyngan data prepare`"
            )
        images = (
            np.memmap(images_path, dtype=np.uint8, mode="r", shape=(count, size, size))
            if count
            else np.zeros((0, size, size), np.uint8)
        )
        return cls(
            root=root, size=size, image_names=names, patients=np.asarray(patients, dtype=str), labels=labels,
            views=np.asarray(views, dtype=str), splits=np.asarray(splits, dtype=str), manifest=manifest,
            sexes=np.asarray(sexes, dtype=str), ages=np.asarray(ages, dtype=np.int64),
            _base=images, _rows=None, _images=images,
        )

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            assert self._base is not None and self._rows is not None
            rows = self._rows
            if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                self._images = self._base[rows[0] : rows[0] + len(rows)]
            else:
                self._images = np.asarray(self._base[rows])
        return self._images

    def __len__(self) -> int:
        return len(self.image_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "PreparedDataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for a dataset of {len(self)} images")
        idx = np.where(idx < 0, idx + len(self), idx)
        base_rows = idx if self._rows is None else self._rows[idx]
        return PreparedDataset(
            root=self.root, size=self.size, image_names=[self.image_names[i] for i in idx],
            patients=self.patients[idx], labels=[self.labels[i] for i in idx], views=self.views[idx],
            splits=self.splits[idx], manifest=self.manifest, sexes=self.sexes[idx], ages=self.ages[idx],
            _base=self._base, _rows=base_rows, _images=None,
        )


def _read_index(path: Path) -> tuple[list[str], list[str], list[tuple[str, ...]], list[str], list[str], list[str],
                                     list[int]]:
    if not path.is_file():
        raise UserError(f"{path}: index missing; re-run `medsyngan data prepare`")
    names: list[str] = []
    patients: list[str] = []
    labels: list[tuple[str, ...]] = []
    views: list[str] = []
    splits: list[str] = []
    sexes: list[str] = []
    ages: list[int] = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(INDEX_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path}: missing columns {sorted(missing)}; re-run `medsyngan data prepare`")
        for line_no, row in enumerate(reader, start=2):
            names.append(row["image"])
            patients.append(row["patient"])
            labels.append(parse_labels(row["labels"]))
            views.append(row["view"])
            splits.append(row["split"])
            sexes.append(row.get("sex") or "")
            age = (row.get("age") or "").strip()
            if age and not age.isdigit():
                raise UserError(f"{path}:{line_no}: age '{age}' is not whole years; re-run `medsyngan data prepare`")
            ages.append(int(age) if age else UNKNOWN_AGE)
    return names, patients, labels, views, splits, sexes, ages


def index_csv_text(
    names: Sequence[str], patients: Sequence[str], labels: Sequence[Sequence[str]], views: Sequence[str],
    splits: Sequence[str], sexes: Sequence[str], ages: Sequence[int],
) -> str:
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS + DEMOGRAPHIC_COLUMNS)
    for row in zip(names, patients, labels, views, splits, sexes, ages):
        writer.writerow((row[0], row[1], format_labels(row[2]), row[3], row[4], row[5], row[6] if row[6] >= 0 else ""))
    return buf.getvalue()
