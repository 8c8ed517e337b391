"""Patient-disjoint splits of a prepared dataset, written as prepared datasets of their own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def holdout_patients(patients: np.ndarray, fraction: float, seed: int) -> set[str]:
    """A fixed-seed random fraction of the patients (at least one, never all)."""
    unique = np.unique(patients.astype(str))
    count = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    chosen = np.random.default_rng(seed).permutation(len(unique))[:count]
    return set(unique[chosen].tolist())


def write_subset(ds, rows: np.ndarray, out: Path, role: str, origin: dict[str, Any]) -> Path:
    """Rows of a prepared dataset as a prepared dataset of their own (built beside ``out``, renamed into place);
    ``origin`` (how the rows were chosen) goes into its manifest.

    An identical subset already at ``out`` is left alone, so that a second process (another seed) started beside
    a running one does not swap the files under its runs.
    """
    from medsyngan.data.prepared import IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, index_csv_text

    sub = ds.subset(rows)
    index = index_csv_text(sub.image_names, sub.patients, sub.labels, sub.views, sub.splits, sub.sexes, sub.ages)
    manifest = dict(ds.manifest, count=len(sub), key=f"{ds.manifest.get('key', '')}:{role}",
                    study_subset={"role": role, **origin})
    manifest_text = json.dumps(manifest, indent=2) + "\n"
    if ((out / MANIFEST_FILE).is_file() and (out / MANIFEST_FILE).read_text() == manifest_text
            and (out / INDEX_FILE).read_text() == index
            and (out / IMAGES_FILE).read_bytes() == np.ascontiguousarray(sub.images).tobytes()):
        return out
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.ascontiguousarray(sub.images).tofile(tmp / IMAGES_FILE)
    (tmp / INDEX_FILE).write_text(index)
    (tmp / MANIFEST_FILE).write_text(manifest_text)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def split_patients(ds, fraction: float, seed: int, kept: Path, held: Path, roles: tuple[str, str]) -> dict[str, int]:
    """Write the dataset's held-out patients (``fraction``, ``seed``) to ``held`` and the others to ``kept``;
    returns the counts of images and patients on each side."""
    is_held = np.isin(ds.patients.astype(str), sorted(holdout_patients(ds.patients, fraction, seed)))
    origin = {"holdout_fraction": fraction, "seed": seed}
    write_subset(ds, np.flatnonzero(~is_held), kept, roles[0], origin)
    write_subset(ds, np.flatnonzero(is_held), held, roles[1], origin)
    return {f"{roles[0]}_images": int((~is_held).sum()), f"{roles[1]}_images": int(is_held.sum()),
            f"{roles[0]}_patients": len(np.unique(ds.patients[~is_held])),
            f"{roles[1]}_patients": len(np.unique(ds.patients[is_held]))}
