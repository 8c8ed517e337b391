"""Reader for the NIH ChestX-ray14 release layout (also what the phantom generator writes).

    ROOT/Data_Entry_2017_v2020.csv  (or Data_Entry_2017.csv)
    ROOT/train_val_list.txt, ROOT/test_list.txt   the official patient-disjoint split
    ROOT/images/*.png                              as unpacked from images_001.tar.gz … images_012.tar.gz
                                                   (also accepted: ROOT/images_0NN/images/*.png, or any folder
                                                   given explicitly)
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsyngan.data.catalogue import Catalogue
from medsyngan.data.prepared import UNKNOWN_AGE, normalize_sex, parse_age, parse_labels
from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
DEMOGRAPHIC_COLUMNS = ("Patient Gender", "Patient Age")


def find_metadata(root: Path) -> Path | None:
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def is_nih_root(root: Path) -> bool:
    return find_metadata(Path(root)) is not None


def image_folders(root: Path, images_dir: Path | None) -> list[Path]:
    if images_dir is not None:
        folder = images_dir if images_dir.is_absolute() or images_dir.is_dir() else root / images_dir
        if not folder.is_dir():
            raise UserError(f"{images_dir}: image folder not found; pass the folder holding the NIH PNG files")
        return [folder]
    if (root / "images").is_dir():
        return [root / "images"]
    nested = sorted(p / "images" for p in root.glob("images_*") if (p / "images").is_dir())
    if nested:
        return nested
    flat = sorted(p for p in root.glob("images_*") if p.is_dir())
    return flat


@dataclass
class NihMetadata:
    """Every row of a Data_Entry CSV: image names, patient ids, findings, view, sex ('M'/'F'/'') and age in years
    (-1 when unknown)."""

    names: list[str] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    sexes: list[str] = field(default_factory=list)
    ages: list[int] = field(default_factory=list)


def read_metadata(csv_path: Path) -> NihMetadata:
    """The rows of a Data_Entry CSV; ``Patient Gender`` and ``Patient Age`` are optional (unknown when absent)."""
    meta = NihMetadata()
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise UserError(
                    f"{csv_path}: missing NIH columns {missing}; expected the Data_Entry_2017 header "
                    f"({', '.join(REQUIRED_COLUMNS)}, ...)"
                )
            i_name, i_lab, i_pat, i_view = (header.index(c) for c in REQUIRED_COLUMNS)
            i_sex, i_age = (header.index(c) if c in header else None for c in DEMOGRAPHIC_COLUMNS)
            width = max(i for i in (i_name, i_lab, i_pat, i_view, i_sex, i_age) if i is not None)
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) <= width:
                    raise UserError(f"{csv_path}:{line_no}: row has {len(row)} fields; fix or remove the row")
                meta.names.append(row[i_name].strip())
                meta.patients.append(row[i_pat].strip())
                meta.labels.append(parse_labels(row[i_lab]))
                meta.views.append(row[i_view].strip())
                meta.sexes.append(normalize_sex(row[i_sex]) if i_sex is not None else "")
                meta.ages.append(parse_age(row[i_age]) if i_age is not None else UNKNOWN_AGE)
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not a text CSV; point --source at the NIH folder") from None
    return meta


def _read_list(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_nih(root: str | Path, images_dir: str | Path | None = None) -> Catalogue:
    root = Path(root)
    csv_path = find_metadata(root)
    if csv_path is None:
        raise UserError(f"{root}: no {' or '.join(CSV_NAMES)}; point --source at the unpacked NIH folder")
    meta = read_metadata(csv_path)
    names = meta.names
    if len(set(names)) != len(names):
        raise UserError(f"{csv_path}: an 'Image Index' appears twice; remove the duplicate rows")

    located: dict[str, Path] = {}
    for folder in image_folders(root, Path(images_dir) if images_dir is not None else None):
        with os.scandir(folder) as it:
            for entry in it:
                located.setdefault(entry.name, Path(entry.path))
    paths = [located.get(n) for n in names]

    test = _read_list(root / "test_list.txt")
    train_val = _read_list(root / "train_val_list.txt")
    if test is None and train_val is None:
        log.warning("%s: no train_val_list.txt / test_list.txt; every image is put in split 'train_val'", root)
        splits = ["train_val"] * len(names)
    elif test is not None:
        splits = ["test" if n in test else "train_val" for n in names]
    else:
        assert train_val is not None
        splits = ["train_val" if n in train_val else "test" for n in names]
    return Catalogue(
        root=root, names=names, paths=paths, patients=np.asarray(meta.patients, dtype=str), labels=meta.labels,
        views=np.asarray(meta.views, dtype=str), splits=np.asarray(splits, dtype=str), kind="nih",
        sexes=np.asarray(meta.sexes, dtype=str), ages=np.asarray(meta.ages, dtype=np.int64),
    )
