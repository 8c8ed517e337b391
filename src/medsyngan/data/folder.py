"""Reader for any folder of chest X-rays (PNG, JPEG, DICOM, searched recursively), with an optional CSV.

The CSV needs a column ``image`` (file name or path relative to the folder) and may have ``patient``,
``labels`` (``|``-separated, ``No Finding`` or empty for none), ``view``, ``sex`` (M/F), ``age`` (years) and
``split`` (``train_val``/``test``); a missing or unreadable sex or age is unknown.
Without a CSV, or without a ``patient`` column, each image is its own patient — patient-level privacy and
patient-disjoint partitions then hold per image, which the reader says in the log.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from medsyngan.data.catalogue import Catalogue
from medsyngan.data.imageio import IMAGE_SUFFIXES
from medsyngan.data.prepared import UNKNOWN_AGE, normalize_sex, parse_age, parse_labels
from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")
SPLITS = ("train_val", "test")


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(root: str | Path, labels_csv: str | Path | None = None) -> Catalogue:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: folder not found; pass a folder of PNG/JPEG/DICOM chest X-rays")
    files = list_images(root)
    by_rel = {p.relative_to(root).as_posix(): p for p in files}
    by_name: dict[str, list[Path]] = {}
    for p in files:
        by_name.setdefault(p.name, []).append(p)

    if labels_csv is None:
        if not files:
            raise UserError(f"{root}: no .png/.jpg/.jpeg/.dcm files found; check the folder")
        log.info("%s: no labels CSV; every image is its own patient, with no labels", root)
        names = list(by_rel)
        return Catalogue(
            root=root, names=names, paths=list(by_rel.values()), patients=np.asarray(names, dtype=str),
            labels=[()] * len(names), views=np.full(len(names), "", dtype=str),
            splits=np.full(len(names), "train_val", dtype=str), kind="folder",
            sexes=np.full(len(names), "", dtype=str), ages=np.full(len(names), UNKNOWN_AGE, dtype=np.int64),
        )

    csv_path = Path(labels_csv)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: labels CSV not found; pass an existing file to --labels")
    names: list[str] = []
    paths: list[Path | None] = []
    patients: list[str] = []
    labels: list[tuple[str, ...]] = []
    views: list[str] = []
    splits: list[str] = []
    sexes: list[str] = []
    ages: list[int] = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if "image" not in columns:
            raise UserError(
                f"{csv_path}: no 'image' column (found {sorted(columns)}); add columns "
                "image[,patient,labels,view,sex,age,split]"
            )
        if "patient" not in columns:
            log.info("%s: no 'patient' column; every image is its own patient", csv_path)
        for line_no, row in enumerate(reader, start=2):
            name = (row["image"] or "").strip()
            if not name:
                raise UserError(f"{csv_path}:{line_no}: empty 'image' value; fill it or remove the row")
            candidates = [by_rel[name]] if name in by_rel else by_name.get(Path(name).name, [])
            if len(candidates) > 1:
                raise UserError(
                    f"{csv_path}:{line_no}: '{name}' matches {len(candidates)} files; give its path relative to {root}"
                )
            split = (row.get("split") or "train_val").strip() or "train_val"
            if split not in SPLITS:
                raise UserError(f"{csv_path}:{line_no}: split '{split}' is not one of {SPLITS}")
            names.append(name)
            paths.append(candidates[0] if candidates else None)
            patients.append((row.get("patient") or "").strip() or name)
            labels.append(parse_labels(row.get("labels") or ""))
            views.append((row.get("view") or "").strip())
            sexes.append(normalize_sex(row.get("sex") or ""))
            ages.append(parse_age(row.get("age") or ""))
            splits.append(split)
    if len(set(names)) != len(names):
        raise UserError(f"{csv_path}: an image is listed twice; remove the duplicate rows")
    return Catalogue(
        root=root, names=names, paths=paths, patients=np.asarray(patients, dtype=str), labels=labels,
        views=np.asarray(views, dtype=str), splits=np.asarray(splits, dtype=str), kind="folder",
        sexes=np.asarray(sexes, dtype=str), ages=np.asarray(ages, dtype=np.int64),
    )
