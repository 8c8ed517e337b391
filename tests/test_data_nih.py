"""The NIH reader and every partition scheme on the real ChestX-ray14 metadata (all 112,120 rows)."""

from __future__ import annotations

import numpy as np
import pytest

from medsyngan.data.nih import read_nih
from medsyngan.data.partition import SCHEMES, partition


@pytest.fixture(scope="module")
def nih(nih_dir):
    return read_nih(nih_dir, "images-64")


def test_reader_keeps_every_row_with_patient_view_labels(nih, nih_dir):
    # Independent of the reader: plain string splitting of the file.
    lines = (nih_dir / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]
    raw = [line.split(",") for line in lines if line]
    assert len(nih) == len(raw) == 112_120
    assert len(set(nih.patients.tolist())) == 30_805
    for i in (0, 1, 5000, 112_119):
        assert nih.names[i] == raw[i][0]
        assert nih.patients[i] == raw[i][3]
        assert nih.views[i] == raw[i][6]
        expected = tuple(sorted(set(raw[i][1].split("|")) - {"No Finding"}))
        assert nih.labels[i] == expected
    assert nih.labels[1] == ("Cardiomegaly", "Emphysema")
    assert sum(1 for labs in nih.labels if not labs) == sum(1 for r in raw if r[1] == "No Finding")
    assert set(nih.views.tolist()) == {"PA", "AP"}


def test_official_split_is_patient_disjoint_and_complete(nih, nih_dir):
    test_names = set((nih_dir / "test_list.txt").read_text().split())
    assert int((nih.splits == "test").sum()) == len(test_names) == 25_596
    assert int((nih.splits == "train_val").sum()) == 86_524
    test_patients = set(nih.patients[nih.splits == "test"].tolist())
    train_patients = set(nih.patients[nih.splits == "train_val"].tolist())
    assert not test_patients & train_patients


def test_sample_images_are_located_and_the_rest_reported_absent(nih):
    present = [p for p in nih.paths if p is not None]
    assert len(present) == 690
    assert all(p.parent.name == "images-64" for p in present)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_is_patient_disjoint_and_covers_each_image_once(nih, scheme):
    # The selection of the train_val split, PA views only, exercises partitioning of a filtered set.
    for mask in (np.ones(len(nih), bool), (nih.splits == "train_val") & (nih.views == "PA")):
        patients = nih.patients[mask]
        labels = [lab for lab, m in zip(nih.labels, mask) if m]
        hosp = partition(patients, labels, 5, scheme, alpha=0.3, seed=7)
        assert hosp.shape == (int(mask.sum()),)  # one hospital per selected image: covered exactly once
        assert set(np.unique(hosp).tolist()) == set(range(5))
        # Independent disjointness check: number of distinct (patient, hospital) pairs == number of patients.
        pairs = {(p, h) for p, h in zip(patients.tolist(), hosp.tolist())}
        assert len(pairs) == len(set(patients.tolist()))
        again = partition(patients, labels, 5, scheme, alpha=0.3, seed=7)
        np.testing.assert_array_equal(hosp, again)


@pytest.mark.slow
def test_scheme_character_on_real_labels(nih):
    patients, labels = nih.patients, nih.labels
    sizes = {s: np.bincount(partition(patients, labels, 4, s, alpha=0.2, seed=1), minlength=4) for s in SCHEMES}
    assert sizes["iid"].max() - sizes["iid"].min() <= 200  # equal image counts up to one large patient
    assert sizes["quantity-skew"].max() > 2 * sizes["quantity-skew"].min()
    hosp = partition(patients, labels, 4, "label-skew", alpha=0.1, seed=1)
    effusion = np.array(["Effusion" in labs for labs in labels])
    shares = np.bincount(hosp[effusion], minlength=4) / np.bincount(hosp, minlength=4)
    assert shares.max() > 2 * shares.min()
