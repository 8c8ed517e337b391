"""Partition schemes on small synthetic sets, partition files, and the data CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from medsyngan.data.partition import SCHEMES, partition, read_partition_csv, write_partition_csv
from medsyngan.data.prepared import PreparedDataset
from medsyngan.errors import UserError


def _toy(n_pat: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, n_pat)
    patients = np.repeat([f"p{i}" for i in range(n_pat)], per)
    findings = ["Nodule", "Effusion", "Mass"]
    labels = [tuple(sorted(set(rng.choice(findings, rng.integers(0, 3))))) for _ in patients]
    return patients, labels


@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes_are_patient_disjoint_deterministic_and_fill_every_hospital(scheme):
    patients, labels = _toy()
    hosp = partition(patients, labels, 4, scheme, alpha=0.5, seed=3)
    assert len(hosp) == len(patients) and set(hosp.tolist()) == {0, 1, 2, 3}
    for p in set(patients.tolist()):
        assert len(set(hosp[patients == p].tolist())) == 1
    np.testing.assert_array_equal(hosp, partition(patients, labels, 4, scheme, alpha=0.5, seed=3))
    assert not np.array_equal(hosp, partition(patients, labels, 4, scheme, alpha=0.5, seed=4))


def test_patient_scheme_balances_patients():
    patients, labels = _toy(41)
    hosp = partition(patients, labels, 4, "patient", seed=0)
    counts = [len(set(patients[hosp == h].tolist())) for h in range(4)]
    assert max(counts) - min(counts) <= 1


def test_impossible_requests_are_refused():
    patients, labels = _toy(3)
    with pytest.raises(UserError, match="exceeds the 3 patients"):
        partition(patients, labels, 4, "iid")
    with pytest.raises(UserError, match="--scheme"):
        partition(patients, labels, 2, "random")
    with pytest.raises(UserError, match="raise --alpha"):
        partition(*_toy(12), 12, "quantity-skew", alpha=0.01)


def _dataset(tmp_path, n_pat=10):
    from PIL import Image

    from medsyngan.data.prepare import PrepareSettings, prepare

    src = tmp_path / "src"
    src.mkdir()
    rows = ["image,patient,labels"]
    for i in range(n_pat * 2):
        Image.fromarray(np.full((16, 16), i, np.uint8)).save(src / f"i{i}.png")
        rows.append(f"i{i}.png,p{i // 2},{'Nodule' if i % 3 == 0 else ''}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return prepare(src, tmp_path / "ds", PrepareSettings(size=16), labels_csv=tmp_path / "labels.csv").dataset


def test_partition_file_round_trip_and_mismatch_is_refused(tmp_path):
    ds = _dataset(tmp_path)
    hosp = partition(ds.patients, ds.labels, 3, "patient", seed=1)
    write_partition_csv(tmp_path / "p.csv", ds.image_names, ds.patients, hosp)
    np.testing.assert_array_equal(read_partition_csv(tmp_path / "p.csv", ds), hosp)
    with pytest.raises(UserError, match="does not match dataset"):
        read_partition_csv(tmp_path / "p.csv", ds.subset(range(5)))
    (tmp_path / "cols.csv").write_text("image,hospital\nx,0\n")
    with pytest.raises(UserError, match="missing columns"):
        read_partition_csv(tmp_path / "cols.csv", ds)


def test_split_patient_in_file_is_refused(tmp_path):
    ds = _dataset(tmp_path)
    names, pats = ds.image_names, list(ds.patients)
    first = pats[0]
    idx = [i for i, p in enumerate(pats) if p == first]
    hosp = np.array([1 if i != idx[0] else 0 for i in range(len(ds))])
    write_partition_csv(tmp_path / "split.csv", names, pats, hosp)
    with pytest.raises(UserError, match="patient-disjoint"):
        read_partition_csv(tmp_path / "split.csv", ds)


@pytest.mark.slow
def test_cli_phantoms_prepare_partition(tmp_path):
    from medsyngan.cli import app

    runner = CliRunner()
    raw, prep, part = tmp_path / "raw", tmp_path / "prep", tmp_path / "part.csv"
    r = runner.invoke(app, ["data", "phantoms", "--out", str(raw), "--patients", "6", "--images-per-patient", "2",
                            "--size", "64", "--seed", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "prepare", "--source", str(raw), "--out", str(prep), "--size", "32",
                            "--equalize", "clahe", "--views", "PA,AP", "--split", "all"])
    assert r.exit_code == 0, r.output
    assert len(PreparedDataset.open(prep)) == 12
    r = runner.invoke(app, ["data", "prepare", "--source", str(raw), "--out", str(prep), "--size", "32",
                            "--equalize", "clahe", "--views", "PA,AP"])
    assert "up to date" in r.output
    r = runner.invoke(app, ["data", "partition", "--data", str(prep), "--hospitals", "3", "--scheme", "label-skew",
                            "--alpha", "1.0", "--seed", "2", "--out", str(part)])
    assert r.exit_code == 0, r.output
    assert part.with_suffix(".png").stat().st_size > 1000
    hosp = read_partition_csv(part, PreparedDataset.open(prep))
    assert set(hosp.tolist()) == {0, 1, 2}
    r = runner.invoke(app, ["data", "partition", "--data", str(tmp_path / "nope"), "--hospitals", "2", "--out", str(part)])
    assert isinstance(r.exception, UserError) and "prepared dataset not found" in str(r.exception)
