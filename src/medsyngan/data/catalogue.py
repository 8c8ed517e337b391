"""What a source holds before preparation: one row per image (file, patient, labels, view, sex, age, split)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Catalogue:
    root: Path
    names: list[str]                 # the image's name in the index (NIH: 'Image Index')
    paths: list[Path | None]         # None: listed in the metadata but the file is absent
    patients: np.ndarray             # str
    labels: list[tuple[str, ...]]
    views: np.ndarray                # str, '' when unknown
    splits: np.ndarray               # 'train_val' | 'test'
    kind: str                        # 'nih' | 'folder'
    sexes: np.ndarray                # str, 'M' | 'F' | '' (unknown)
    ages: np.ndarray                 # int, years; -1 when unknown

    def __len__(self) -> int:
        return len(self.names)

    def select(self, mask: np.ndarray) -> "Catalogue":
        idx = np.flatnonzero(mask)
        return Catalogue(
            root=self.root, names=[self.names[i] for i in idx], paths=[self.paths[i] for i in idx],
            patients=self.patients[idx], labels=[self.labels[i] for i in idx], views=self.views[idx],
            splits=self.splits[idx], kind=self.kind, sexes=self.sexes[idx], ages=self.ages[idx],
        )

    def fingerprint(self) -> str:
        """Hash of the metadata and of each file's size and modification time (cheap, catches replaced files)."""
        h = hashlib.sha256()
        for name, path, patient, labels, view, split, sex, age in zip(
            self.names, self.paths, self.patients, self.labels, self.views, self.splits, self.sexes, self.ages
        ):
            if path is not None and path.is_file():
                st = path.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            else:
                stamp = "absent"
            h.update(f"{name}\t{path}\t{patient}\t{'|'.join(labels)}\t{view}\t{split}\t{sex}\t{age}\t{stamp}\n".encode())
        return h.hexdigest()
