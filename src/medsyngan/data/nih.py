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
from pathlib import Path

import numpy as np

from medsyngan.data.catalogue import Catalogue
from medsyngan.data.prepared import parse_labels
from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")

CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


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


def read_metadata(csv_path: Path) -> tuple[list[str], list[str], list[tuple[str, ...]], list[str]]:
    """Image names, patient ids, labels and view positions of every row of a Data_Entry CSV."""
    names: list[str] = []
    patients: list[str] = []
    labels: list[tuple[str, ...]] = []
    views: list[str] = []
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
            width = max(i_name, i_lab, i_pat, i_view)
            for line_no, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) <= width:
                    raise UserError(f"{csv_path}:{line_no}: row has {len(row)} fields; fix or remove the row")
                names.append(row[i_name].strip())
                patients.append(row[i_pat].strip())
                labels.append(parse_labels(row[i_lab]))
                views.append(row[i_view].strip())
    except UnicodeDecodeError:
        raise UserError(f"{csv_path}: not a text CSV; point --source at the NIH folder") from None
    return names, patients, labels, views


def _read_list(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_nih(root: str | Path, images_dir: str | Path | None = None) -> Catalogue:
    root = Path(root)
    csv_path = find_metadata(root)
    if csv_path is None:
        raise UserError(f"{root}: no {' or '.join(CSV_NAMES)}; point --source at the unpacked NIH folder")
    names, patients, labels, views = read_metadata(csv_path)
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
        root=root, names=names, paths=paths, patients=np.asarray(patients, dtype=str), labels=labels,
        views=np.asarray(views, dtype=str), splits=np.asarray(splits, dtype=str), kind="nih",
    )
