"""Several prepared datasets as one: a public source made of more than one public set (the phantoms and the
COVID-19 films), written once as a prepared dataset of its own.

Each part is named; its name prefixes the part's patient ids (``phantoms:17``) and image names
(``covid-cxr/images/fff13f3a.png``), so that two parts never share a patient — a patient-level split or
partition of the union then never puts one part's patient beside another's under the same id. Labels, views,
splits, sexes and ages are the parts' own. The union is keyed by the keys of its parts (each part's manifest
``key``, which changes whenever the part is prepared from other inputs or settings), so a changed part builds a
new union.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from medsyngan.data.prepared import FORMAT_VERSION, IMAGES_FILE, INDEX_FILE, MANIFEST_FILE, PreparedDataset, \
    index_csv_text
from medsyngan.errors import UserError

log = logging.getLogger("medsyngan")


def union_key(parts: Mapping[str, PreparedDataset]) -> str:
    """The key of the union of ``parts``: their names, in order, and each part's own key."""
    blob = json.dumps({"format": FORMAT_VERSION, "union": [[name, ds.manifest.get("key", "")]
                                                          for name, ds in parts.items()]})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def union_dataset(parts: Mapping[str, PreparedDataset], root: Path) -> PreparedDataset:
    """Build (once) and open the union of ``parts`` (name → dataset, all of one image size) in ``root/<key>``.

    A file lock makes concurrent callers (simulated hospitals starting together) build it once; it is written
    beside its place and renamed into it, so that no reader ever opens a half-written union.
    """
    if len({ds.size for ds in parts.values()}) > 1:
        sizes = ", ".join(f"{name} {ds.size} px" for name, ds in parts.items())
        raise UserError(f"the parts of a union differ in image size ({sizes}); prepare them at one data.size")
    out = root / union_key(parts)
    if (out / MANIFEST_FILE).is_file():
        return PreparedDataset.open(out)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_FILE).is_file():
            log.info("writing the union of %s in %s", " and ".join(parts), out)
            tmp = root / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _write_union(parts, tmp, out.name)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return PreparedDataset.open(out)


def _write_union(parts: Mapping[str, PreparedDataset], folder: Path, key: str) -> None:
    folder.mkdir(parents=True)
    with open(folder / IMAGES_FILE, "wb") as fh:
        for ds in parts.values():
            fh.write(np.ascontiguousarray(ds.images).tobytes())
    items = list(parts.items())
    (folder / INDEX_FILE).write_text(index_csv_text(
        [f"{name}/{image}" for name, ds in items for image in ds.image_names],
        [f"{name}:{patient}" for name, ds in items for patient in ds.patients],
        [labels for _, ds in items for labels in ds.labels],
        np.concatenate([ds.views for _, ds in items]), np.concatenate([ds.splits for _, ds in items]),
        np.concatenate([ds.sexes for _, ds in items]), np.concatenate([ds.ages for _, ds in items]),
    ))
    manifest = {
        "format": FORMAT_VERSION, "count": sum(len(ds) for ds in parts.values()),
        "size": next(iter(parts.values())).size, "key": key,
        "parts": {name: {"key": ds.manifest.get("key", ""), "count": len(ds), "source": str(ds.root)}
                  for name, ds in items},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
