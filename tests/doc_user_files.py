"""What a reader of the documentation has and a test machine does not, staged for tests/test_readme.py.

`stage_user_files` builds, in a scratch folder laid out like the repository's root, the "downloaded" NIH release
in `data/nih-download/` (archives `images_00N.tar.gz` of real 64-px NIH images with the metadata rows and split
lists of exactly those images; phantoms packed the same way when the NIH sample is missing) and a folder of the
user's own PNG and DICOM X-rays with its labels CSV (`data/my-xrays/`, `data/my-xrays.csv`).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from dicom_files import write_xray_dicom

from medsyngan.data.shared import nih_sample_dir

REPO = Path(__file__).resolve().parents[1]
NIH_DIR = nih_sample_dir()


def _nih_sample_release(download: Path) -> int:
    """A miniature NIH release from the real 64-px sample: two archives of `images/…` PNGs, and the metadata
    rows and split lists of exactly those images. The sample holds only official train_val images, so the
    patients whose id is a multiple of 5 are listed as test here (still patient-disjoint), so that the
    guides' test split has images."""
    names = sorted(p.name for p in (NIH_DIR / "images-64").glob("*.png"))
    wanted = set(names)
    with open(NIH_DIR / "Data_Entry_2017_v2020.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [row for row in reader if row[0] in wanted]
    with open(download / "Data_Entry_2017_v2020.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + rows)
    test = [n for n in names if int(n.split("_")[0]) % 5 == 0]
    (download / "train_val_list.txt").write_text("".join(n + "\n" for n in names if n not in set(test)))
    (download / "test_list.txt").write_text("".join(n + "\n" for n in test))
    half = len(names) // 2
    for k, chunk in enumerate((names[:half], names[half:]), start=1):
        with tarfile.open(download / f"images_{k:03d}.tar.gz", "w:gz") as tar:
            for name in chunk:
                tar.add(NIH_DIR / "images-64" / name, arcname=f"images/{name}")
    return len(names)


def _phantom_release(download: Path, scratch: Path) -> int:
    """Without the NIH sample: phantoms, which are written in the NIH layout, packed the same way. 120 patients:
    with 60, the data guide's label-skew partition (α = 0.5, seed 0) left a hospital 2 patients, too few for its
    batch."""
    source = scratch / "phantom-release"
    subprocess.run([sys.executable, "-m", "medsyngan.cli", "data", "phantoms", "--out", str(source), "--patients",
                    "120", "--images-per-patient", "3", "--size", "64"], check=True, capture_output=True)
    for name in ("Data_Entry_2017_v2020.csv", "train_val_list.txt", "test_list.txt"):
        (download / name).write_bytes((source / name).read_bytes())
    with tarfile.open(download / "images_001.tar.gz", "w:gz") as tar:
        tar.add(source / "images", arcname="images")
    return len(list((source / "images").glob("*.png")))


def _my_xrays(data: Path, nih_images: Path) -> None:
    """A user's own folder: PNGs and DICOMs (one in a subfolder, as in the data guide's CSV example) with labels."""
    from PIL import Image

    folder = data / "my-xrays"
    (folder / "sub").mkdir(parents=True)
    sources = sorted(nih_images.rglob("*.png"))[:8]
    rows = [("image", "patient", "labels", "view", "split")]
    for k, src in enumerate(sources):
        grey = np.asarray(Image.open(src).convert("L"))
        patient, split = f"p{k // 2:03d}", "test" if k >= 6 else "train_val"
        name = "sub/a.dcm" if k == 0 else (f"x{k}.dcm" if k % 3 == 0 else f"x{k}.png")
        if name.endswith(".dcm"):
            write_xray_dicom(folder / name, grey.astype(np.uint16) * 16, patient)
        else:
            Image.fromarray(grey).save(folder / name)
        rows.append((name, patient, "Effusion|Nodule" if k == 0 else "No Finding", "PA", split))
    with open(data / "my-xrays.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def stage_user_files(scratch: Path, work: Path) -> bool:
    """Returns whether the real NIH sample is available (else the release is staged from phantoms)."""
    shared = scratch / "shared" / "data"
    shared.mkdir(parents=True)
    download = work / "data" / "nih-download"
    download.mkdir(parents=True)
    have_nih = (NIH_DIR / "Data_Entry_2017_v2020.csv").is_file() and (NIH_DIR / "images-64").is_dir()
    if have_nih:
        (shared / "nih-chestxray14").symlink_to(NIH_DIR, target_is_directory=True)
        _nih_sample_release(download)
    else:
        _phantom_release(download, scratch)
    unpacked = scratch / "unpacked"
    for archive in sorted(download.glob("images_*.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
    _my_xrays(work / "data", unpacked)
    return have_nih
