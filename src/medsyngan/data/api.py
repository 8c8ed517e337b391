"""What the layers above call to get training data from a configuration."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from medsyngan.config import Config
from medsyngan.data.phantoms import PHANTOM_VERSION, write_phantoms
from medsyngan.data.prepare import PrepareSettings, prepare
from medsyngan.data.prepared import DEMOGRAPHIC_COLUMNS, FORMAT_VERSION, INDEX_COLUMNS, MANIFEST_FILE, PreparedDataset
from medsyngan.data.union import union_dataset
from medsyngan.errors import UserError
from medsyngan.runtime import cache_dir

log = logging.getLogger("medsyngan")


def phantom_key(patients: int, images_per_patient: int, size: int, seed: int) -> str:
    blob = json.dumps(
        {"phantoms": PHANTOM_VERSION, "format": FORMAT_VERSION, "index": INDEX_COLUMNS + DEMOGRAPHIC_COLUMNS,
         "patients": patients, "images_per_patient": images_per_patient, "size": size, "seed": seed},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def phantom_dataset(
    patients: int, images_per_patient: int, size: int, seed: int, root: Path | None = None, workers: int = 0
) -> PreparedDataset:
    """Build (once) and open a prepared phantom set under root (default: the cache), keyed by its settings.

    A file lock makes concurrent callers (simulated hospitals starting together) build it once.
    """
    base = (root or cache_dir() / "phantoms") / phantom_key(patients, images_per_patient, size, seed)
    prepared = base / "prepared"
    if (prepared / MANIFEST_FILE).is_file():
        return PreparedDataset.open(prepared)
    base.parent.mkdir(parents=True, exist_ok=True)
    with open(base.parent / f"{base.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (prepared / MANIFEST_FILE).is_file():
            log.info("building %d phantom patients × %d images at %d px in %s", patients, images_per_patient, size, base)
            raw = base / "raw"
            shutil.rmtree(raw, ignore_errors=True)
            write_phantoms(raw, patients, images_per_patient, size, seed, workers=workers)
            prepare(raw, prepared, PrepareSettings(size=size), workers=workers)
            # The PNGs were only the route through the one reader; the memmap is what training reads.
            shutil.rmtree(raw, ignore_errors=True)
    return PreparedDataset.open(prepared)


def covid_dataset(size: int, root: Path | None = None, workers: int = 0) -> PreparedDataset:
    """The public COVID-19 chest X-rays (:func:`~medsyngan.data.shared.covid_cxr_dir`), centre-cropped and resized
    to ``size`` once under root (default: the cache), with their patient ids, views and sexes; a public source for
    pretraining and for the re-identification verifier. ``prepare`` keys the result by its inputs, so a changed
    source folder is prepared again."""
    from medsyngan.data.shared import covid_cxr_dir

    source = covid_cxr_dir()
    if not (source / "labels.csv").is_file():
        raise UserError(f"{source}: the COVID-19 CXR set (labels.csv, images/) is not there; set "
                        "MEDSYNGAN_SHARED_DATA to the folder that holds covid19-cxr-ml-workgroup/")
    out = (root or cache_dir() / "covid-cxr") / f"{size}px"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prepare(source, out, PrepareSettings(size=size), labels_csv=source / "labels.csv", workers=workers)
    return PreparedDataset.open(out)


def public_mix_dataset(phantom_patients: int, images_per_patient: int, size: int, seed: int) -> PreparedDataset:
    """Every phantom film (:func:`phantom_dataset`) and every public COVID-19 film (:func:`covid_dataset`) once,
    as one prepared dataset in the cache; patient ids and image names carry their part's name
    (``phantoms:17``, ``covid-cxr:024e7871``), and a rebuilt part builds the union anew."""
    parts = {"phantoms": phantom_dataset(phantom_patients, images_per_patient, size, seed),
             "covid-cxr": covid_dataset(size)}
    return union_dataset(parts, cache_dir() / "phantoms+covid-cxr")


def load_training_data(cfg: Config) -> PreparedDataset:
    data = cfg.data
    if data.size != cfg.model.resolution:
        raise UserError(
            f"data.size ({data.size}) differs from model.resolution ({cfg.model.resolution}); set both the same"
        )
    if data.source == "phantoms":
        ds = phantom_dataset(data.phantom_patients, data.phantom_images_per_patient, data.size, data.seed)
        return select_split(ds, data.split, "phantoms")
    if data.source == "covid-cxr":
        return select_split(covid_dataset(data.size), data.split, "covid-cxr")
    if data.source == "phantoms+covid-cxr":
        ds = public_mix_dataset(data.phantom_patients, data.phantom_images_per_patient, data.size, data.seed)
        return select_split(ds, data.split, "phantoms+covid-cxr")
    if not data.path:
        raise UserError("data.source = 'prepared' but data.path is empty; set data.path to a `data prepare` output")
    ds = PreparedDataset.open(data.path)
    if ds.size != cfg.model.resolution:
        raise UserError(
            f"{data.path}: images are {ds.size} px but model.resolution is {cfg.model.resolution}; "
            f"prepare the data with --size {cfg.model.resolution} or set model.resolution={ds.size}"
        )
    return select_split(ds, data.split, data.path)


def select_split(ds: PreparedDataset, split: str, origin: str) -> PreparedDataset:
    """The rows of one split ('all' keeps everything); an empty selection is an error naming the fix."""
    if split == "all":
        return ds
    rows = np.flatnonzero(ds.splits == split)
    if len(rows) == 0:
        found = ", ".join(sorted(set(ds.splits.tolist()))) or "none"
        raise UserError(f"{origin}: no images in split '{split}' (splits present: {found}); set data.split=all "
                        "or prepare from a source with train_val/test lists")
    return ds.subset(rows)
