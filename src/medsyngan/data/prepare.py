"""`prepare`: a source (NIH layout or folder) → a prepared dataset (see prepared.py), on every core.

The output is built in a hidden sibling folder and renamed into place at the end, so an interrupted run leaves
the previous dataset (or nothing) and never a half-written one. The manifest carries a key — a hash of the
settings and of the inputs (metadata plus each file's size and modification time) — and a second run with the
same key returns at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medsyngan.data.catalogue import Catalogue
from medsyngan.data.folder import read_folder
from medsyngan.data.imageio import BadImage, read_grey
from medsyngan.data.nih import is_nih_root, read_nih
from medsyngan.data.parallel import map_in_workers
from medsyngan.data.prepared import (
    FORMAT_VERSION, IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, PreparedDataset, index_csv_text,
)
from medsyngan.data.transforms import ASPECT, EQUALIZE, process
from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")
SKIPPED_FILE = "skipped.csv"
SPLIT_CHOICES = ("train_val", "test", "all")


@dataclass(frozen=True)
class PrepareSettings:
    size: int = 64
    equalize: str = "none"
    aspect: str = "crop"
    views: tuple[str, ...] = ()      # empty: every view
    split: str = "all"
    skip_bad: bool = False

    def validate(self) -> "PrepareSettings":
        if not 8 <= self.size <= 4096:
            raise UserError(f"--size {self.size}: choose a side between 8 and 4096 px (64/128/224/256 are common)")
        if self.equalize not in EQUALIZE:
            raise UserError(f"--equalize {self.equalize}: choose one of {', '.join(EQUALIZE)}")
        if self.aspect not in ASPECT:
            raise UserError(f"--aspect {self.aspect}: choose one of {', '.join(ASPECT)}")
        if self.split not in SPLIT_CHOICES:
            raise UserError(f"--split {self.split}: choose one of {', '.join(SPLIT_CHOICES)}")
        return self


@dataclass
class PrepareResult:
    dataset: PreparedDataset
    rebuilt: bool
    skipped: list[tuple[str, str]]   # (image, reason)
    seconds: float


def read_source(source: str | Path, images_dir: str | Path | None = None, labels_csv: str | Path | None = None) -> Catalogue:
    root = Path(source)
    if not root.exists():
        raise UserError(f"{root}: source not found; pass the NIH folder or a folder of X-ray images to --source")
    if is_nih_root(root):
        if labels_csv is not None:
            raise UserError(f"{root} is an NIH folder (labels come from its Data_Entry CSV); drop --labels")
        return read_nih(root, images_dir)
    if images_dir is not None:
        raise UserError(f"{root}: --images applies to NIH folders only (no Data_Entry_2017*.csv here)")
    return read_folder(root, labels_csv)


def select(cat: Catalogue, settings: PrepareSettings) -> Catalogue:
    mask = np.ones(len(cat), bool)
    if settings.split != "all":
        mask &= cat.splits == settings.split
    if settings.views:
        mask &= np.isin(cat.views, list(settings.views))
    chosen = cat.select(mask)
    if len(chosen) == 0:
        raise UserError(
            f"{cat.root}: no image left after --split {settings.split} --views {','.join(settings.views) or 'all'} "
            f"(of {len(cat)}); widen the filters"
        )
    return chosen


def _work(job: tuple[str, int, str, str]) -> tuple[bool, bytes | str]:
    path, size, aspect, equalize = job
    try:
        return True, process(read_grey(Path(path)), size, aspect, equalize).tobytes()
    except BadImage as exc:
        return False, str(exc)


def _dataset_key(settings: PrepareSettings, fingerprint: str) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "settings": asdict(settings), "inputs": fingerprint}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _existing(out: Path, key: str) -> PreparedDataset | None:
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("key") != key:
        return None
    try:
        return PreparedDataset.open(out)
    except UserError:
        return None


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not a prepared dataset: nothing a user made is lost."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise UserError(f"{out}: folder is not empty and is not a prepared dataset; choose another --out")


def prepare(
    source: str | Path,
    out: str | Path,
    settings: PrepareSettings,
    images_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    workers: int = 0,
    progress_cb: Callable[[int, int], None] | None = None,
) -> PrepareResult:
    """progress_cb(done, total) is called as images finish."""
    settings.validate()
    start = time.perf_counter()
    out = Path(out)
    _check_out(out)
    cat = select(read_source(source, images_dir, labels_csv), settings)
    fingerprint = cat.fingerprint()
    key = _dataset_key(settings, fingerprint)
    existing = _existing(out, key)
    if existing is not None:
        log.info("%s is up to date (same inputs and settings); nothing to do", out)
        return PrepareResult(existing, False, _read_skipped(out), time.perf_counter() - start)

    skipped: list[tuple[str, str]] = []
    missing = [i for i, p in enumerate(cat.paths) if p is None]
    if missing and not settings.skip_bad:
        first = cat.names[missing[0]]
        raise UserError(
            f"{cat.root}: {len(missing)} of {len(cat)} listed images are missing (first: {first}); unpack all "
            "image archives, point --images at them, or pass --skip-bad to prepare only the images present"
        )
    skipped += [(cat.names[i], "file not found") for i in missing]
    todo = [i for i, p in enumerate(cat.paths) if p is not None]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    kept: list[int] = []
    try:
        jobs = [(str(cat.paths[i]), settings.size, settings.aspect, settings.equalize) for i in todo]
        results = map_in_workers(_work, jobs, workers=workers, cost=settings.size * settings.size * 4)
        try:
            with open(tmp / IMAGES_FILE, "wb") as fh:
                for done, (i, (ok, payload)) in enumerate(zip(todo, results), start=1):
                    if ok:
                        fh.write(payload)  # type: ignore[arg-type]
                        kept.append(i)
                    elif settings.skip_bad:
                        skipped.append((cat.names[i], str(payload)))
                    else:
                        raise UserError(f"{cat.paths[i]}: {payload}; fix or remove the file, or pass --skip-bad")
                    if progress_cb is not None:
                        progress_cb(done, len(todo))
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            results.close()  # stops the worker pool early when a bad file ends the run
        if not kept:
            raise UserError(f"{cat.root}: none of the {len(cat)} selected images could be read; see {SKIPPED_FILE}")
        final = cat.select(np.isin(np.arange(len(cat)), kept))
        (tmp / INDEX_FILE).write_text(
            index_csv_text(final.names, final.patients, final.labels, final.views, final.splits, final.sexes,
                           final.ages)
        )
        if skipped:
            (tmp / SKIPPED_FILE).write_text(_csv_text(("image", "reason"), skipped))
        manifest = {
            "format": FORMAT_VERSION, "count": len(kept), "size": settings.size, "key": key,
            "settings": asdict(settings), "source": str(Path(source).resolve()), "source_kind": cat.kind,
            "inputs": fingerprint, "skipped": len(skipped), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if skipped:
        log.warning("skipped %d of %d images; the list is in %s", len(skipped), len(cat), out / SKIPPED_FILE)
    return PrepareResult(PreparedDataset.open(out), True, skipped, time.perf_counter() - start)


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _csv_text(header: tuple[str, ...], rows: list[tuple[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _read_skipped(out: Path) -> list[tuple[str, str]]:
    path = out / SKIPPED_FILE
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [(r["image"], r["reason"]) for r in csv.DictReader(fh)]
