"""Split a dataset into hospitals, always by patient (a patient's images never sit in two hospitals).

Schemes:
- ``iid``: patients shuffled and dealt to the hospital with the fewest images so far (equal image counts).
- ``patient``: patients shuffled and cut into equal patient counts.
- ``label-skew``: each patient has a primary finding (their rarest finding, or No Finding); for every finding
  the hospitals' shares are drawn from Dirichlet(alpha) and its patients dealt accordingly (Hsu et al. 2019).
- ``quantity-skew``: hospital shares of the patients drawn from Dirichlet(alpha).
Small alpha means strong skew. A draw that leaves a hospital empty is redrawn; if that keeps happening the
request is refused.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from medsyngan.errors import UserError

SCHEMES = ("iid", "patient", "label-skew", "quantity-skew")
_MAX_DRAWS = 200


def _patient_index(patients: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique patients (sorted) and, per image, the patient's position in that list."""
    uniq, inverse = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    return uniq, inverse


def _primary_labels(inverse: np.ndarray, labels: Sequence[tuple[str, ...]], n_patients: int) -> np.ndarray:
    freq = Counter(lab for labs in labels for lab in labs)
    # Rank findings from rare to common; a patient takes the rarest finding any of their images has.
    rank = {lab: i for i, (lab, _) in enumerate(sorted(freq.items(), key=lambda kv: (kv[1], kv[0])))}
    none = len(rank)
    primary = np.full(n_patients, none, dtype=np.int64)
    for p, labs in zip(inverse, labels):
        for lab in labs:
            primary[p] = min(primary[p], rank[lab])
    return primary


def _split_by_shares(order: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Cut a sequence of patients into consecutive runs with the given shares; returns hospital per position."""
    cuts = np.round(np.cumsum(shares)[:-1] * len(order)).astype(np.int64)
    out = np.empty(len(order), dtype=np.int64)
    for h, chunk in enumerate(np.split(np.arange(len(order)), cuts)):
        out[chunk] = h
    return out


def partition(
    patients: Sequence[str] | np.ndarray,
    labels: Sequence[tuple[str, ...]],
    hospitals: int,
    scheme: str,
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Hospital (0..hospitals-1) of every image; deterministic for a seed."""
    if scheme not in SCHEMES:
        raise UserError(f"--scheme {scheme}: choose one of {', '.join(SCHEMES)}")
    if hospitals < 1:
        raise UserError(f"--hospitals {hospitals}: need at least one hospital")
    if alpha <= 0:
        raise UserError(f"--alpha {alpha}: the Dirichlet concentration must be positive")
    if len(labels) != len(patients):
        raise ValueError("patients and labels must have one entry per image")
    uniq, inverse = _patient_index(patients)
    n_pat = len(uniq)
    if hospitals > n_pat:
        raise UserError(f"--hospitals {hospitals} exceeds the {n_pat} patients; every hospital needs a patient")
    rng = np.random.default_rng([seed, SCHEMES.index(scheme)])
    images_per_patient = np.bincount(inverse, minlength=n_pat)

    if scheme == "iid":
        order = rng.permutation(n_pat)
        load = np.zeros(hospitals, dtype=np.int64)
        of_patient = np.empty(n_pat, dtype=np.int64)
        for p in order:
            h = int(np.argmin(load))
            of_patient[p] = h
            load[h] += images_per_patient[p]
    elif scheme == "patient":
        order = rng.permutation(n_pat)
        of_patient = np.empty(n_pat, dtype=np.int64)
        of_patient[order] = np.arange(n_pat) % hospitals
    elif scheme == "quantity-skew":
        order = rng.permutation(n_pat)
        for _ in range(_MAX_DRAWS):
            shares = rng.dirichlet(np.full(hospitals, alpha))
            of_patient = np.empty(n_pat, dtype=np.int64)
            of_patient[order] = _split_by_shares(order, shares)
            if len(np.unique(of_patient)) == hospitals:
                break
        else:
            raise _skew_refusal(hospitals, n_pat, alpha)
    else:
        primary = _primary_labels(inverse, labels, n_pat)
        groups = [rng.permutation(np.flatnonzero(primary == k)) for k in np.unique(primary)]
        for _ in range(_MAX_DRAWS):
            of_patient = np.empty(n_pat, dtype=np.int64)
            for members in groups:
                shares = rng.dirichlet(np.full(hospitals, alpha))
                of_patient[members] = _split_by_shares(members, shares)
            if len(np.unique(of_patient)) == hospitals:
                break
        else:
            raise _skew_refusal(hospitals, n_pat, alpha)
    return of_patient[inverse]


def _skew_refusal(hospitals: int, n_pat: int, alpha: float) -> UserError:
    return UserError(
        f"could not give each of {hospitals} hospitals a patient in {_MAX_DRAWS} draws with alpha={alpha} "
        f"({n_pat} patients); raise --alpha or use fewer --hospitals"
    )


def write_partition_csv(path: str | Path, image_names: Sequence[str], patients: Sequence[str], hospital: np.ndarray) -> None:
    from medsyngan.rundir import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("image", "patient", "hospital"))
    writer.writerows(zip(image_names, patients, (int(h) for h in hospital)))
    atomic_write_text(Path(path), buf.getvalue())


def read_partition_csv(path: str | Path, dataset) -> np.ndarray:
    """Hospital of each image of ``dataset`` (a PreparedDataset), in the dataset's order.

    Refuses a file that does not cover exactly the dataset's images, or disagrees on a patient.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: partition file not found; create it with `medsyngan data partition`")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "patient", "hospital"} - set(reader.fieldnames or ())
        if missing:
            raise UserError(f"{path}: missing columns {sorted(missing)}; expected image,patient,hospital")
        rows: dict[str, tuple[str, int]] = {}
        for line_no, row in enumerate(reader, start=2):
            try:
                h = int(row["hospital"])
            except (TypeError, ValueError):
                raise UserError(f"{path}:{line_no}: hospital '{row['hospital']}' is not an integer") from None
            if h < 0:
                raise UserError(f"{path}:{line_no}: hospital {h} is negative")
            if row["image"] in rows:
                raise UserError(f"{path}:{line_no}: image {row['image']} appears twice; regenerate the partition")
            rows[row["image"]] = (row["patient"], h)
    names = list(dataset.image_names)
    absent = [n for n in names if n not in rows]
    extra = len(rows) - (len(names) - len(absent))
    if absent or extra:
        raise UserError(
            f"{path}: does not match dataset {dataset.root} ({len(absent)} of its images missing, {extra} unknown "
            "images); run `medsyngan data partition` on this dataset"
        )
    out = np.empty(len(names), dtype=np.int64)
    for i, (name, patient) in enumerate(zip(names, dataset.patients)):
        p, h = rows[name]
        if p != str(patient):
            raise UserError(f"{path}: image {name} has patient {p} but the dataset says {patient}; regenerate it")
        out[i] = h
    n_h = int(out.max()) + 1
    empty = sorted(set(range(n_h)) - set(out.tolist()))
    if empty:
        raise UserError(f"{path}: hospitals {empty} hold no image; regenerate the partition")
    check_patient_disjoint(dataset.patients, out, origin=str(path))
    return out


def check_patient_disjoint(patients: Sequence[str] | np.ndarray, hospital: np.ndarray, origin: str = "partition") -> None:
    _, inverse = _patient_index(patients)
    first = np.full(inverse.max() + 1 if len(inverse) else 0, -1, dtype=np.int64)
    for p, h in zip(inverse, hospital):
        if first[p] == -1:
            first[p] = h
        elif first[p] != h:
            raise UserError(f"{origin}: a patient's images are in hospitals {first[p]} and {h}; partitions must be patient-disjoint")


def summary(hospital: np.ndarray, patients: Sequence[str] | np.ndarray, labels: Sequence[tuple[str, ...]]) -> list[dict]:
    """Per hospital: images, patients and the count of each finding ('No Finding' for none)."""
    pats = np.asarray(patients, dtype=str)
    rows = []
    for h in range(int(hospital.max()) + 1):
        idx = np.flatnonzero(hospital == h)
        counts = Counter(lab for i in idx for lab in (labels[i] or ("No Finding",)))
        rows.append({"hospital": h, "images": len(idx), "patients": len(np.unique(pats[idx])), "labels": dict(counts)})
    return rows


def plot_summary(rows: list[dict], path: str | Path) -> None:
    """Stacked bars of findings per hospital (a multi-label image counts once per finding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medsyngan.rundir import atomic_write_bytes

    names = sorted({lab for r in rows for lab in r["labels"]}, key=lambda n: (n != "No Finding", n))
    fig, (ax_size, ax_lab) = plt.subplots(1, 2, figsize=(11, 4))
    hs = [f"H{r['hospital']}" for r in rows]
    ax_size.bar(hs, [r["images"] for r in rows], color="#4c72b0", label="images")
    ax_size.bar(hs, [r["patients"] for r in rows], color="#dd8452", width=0.4, label="patients")
    ax_size.set_title("size per hospital")
    ax_size.legend()
    bottom = np.zeros(len(rows))
    cmap = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        vals = np.array([r["labels"].get(name, 0) for r in rows], dtype=float)
        ax_lab.bar(hs, vals, bottom=bottom, color=cmap(k % 20), label=name)
        bottom += vals
    ax_lab.set_title("findings per hospital")
    ax_lab.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
