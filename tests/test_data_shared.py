"""The shared real data sets are located in one place, and a test that needs them fails under CI when they are
missing instead of skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsyngan.data import shared
from medsyngan.errors import UserError

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).with_name("conftest.py")


def test_the_shared_folder_comes_from_the_environment_or_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv(shared.SHARED_DATA_ENV, raising=False)
    monkeypatch.delenv(shared.NIH_ENV, raising=False)
    checkout = Path(shared.__file__).resolve().parents[3]
    assert shared.source_checkout() == checkout
    assert shared.shared_data_dir() == checkout.parent / "shared" / "data"
    monkeypatch.setenv(shared.SHARED_DATA_ENV, str(tmp_path))
    assert shared.nih_sample_dir() == tmp_path / "nih-chestxray14"
    assert shared.covid_cxr_dir() == tmp_path / "covid19-cxr-ml-workgroup"
    monkeypatch.setenv(shared.NIH_ENV, str(tmp_path / "elsewhere"))
    assert shared.nih_sample_dir() == tmp_path / "elsewhere"
    assert shared.covid_cxr_dir() == tmp_path / "covid19-cxr-ml-workgroup"


def test_an_installed_package_without_the_variable_names_it(monkeypatch):
    monkeypatch.delenv(shared.SHARED_DATA_ENV, raising=False)
    monkeypatch.setattr(shared, "source_checkout", lambda: None)
    with pytest.raises(UserError, match=shared.SHARED_DATA_ENV):
        shared.shared_data_dir()


NEEDS_NIH = """
def test_needs_the_sample(nih_dir):
    assert (nih_dir / "images-64").is_dir()


def test_runs_without_the_sample(nih_sample):
    assert nih_sample is None or (nih_sample / "images-64").is_dir()
"""


@pytest.mark.parametrize("ci, outcome", [
    (None, {"skipped": 1, "passed": 1}),
    ("false", {"skipped": 1, "passed": 1}),
    ("true", {"errors": 2}),
    ("1", {"errors": 2}),
])
def test_a_missing_sample_skips_locally_and_fails_under_ci(pytester, monkeypatch, ci, outcome):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(NEEDS_NIH)
    monkeypatch.setenv(shared.NIH_ENV, str(pytester.path / "no-such-folder"))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(**outcome)
    if ci in ("true", "1"):
        result.stdout.fnmatch_lines(["*NIH ChestX-ray14 sample not found at *no-such-folder, and CI is set*"])
    else:
        result.stdout.fnmatch_lines(["*SKIPPED*NIH ChestX-ray14 sample not found at *no-such-folder*"])


def test_a_present_sample_is_handed_to_the_tests(pytester, monkeypatch):
    sample = pytester.path / "nih"
    (sample / "images-64").mkdir(parents=True)
    (sample / "Data_Entry_2017_v2020.csv").write_text("Image Index\n")
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(NEEDS_NIH)
    monkeypatch.setenv(shared.NIH_ENV, str(sample))
    monkeypatch.setenv("CI", "true")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_the_covid_films_are_a_training_source_with_their_patients_views_and_sexes(medsyngan_cache, monkeypatch,
                                                                                    tmp_path, covid_dir):
    import numpy as np

    from medsyngan.config import load_config
    from medsyngan.data.api import load_training_data

    ds = load_training_data(load_config("public-covid64", ["data.size=32", "model.resolution=32"]))
    assert ds.images.shape == (243, 32, 32) and len(np.unique(ds.patients)) == 71
    assert set(ds.views) == {"AP", "PA"} and set(ds.sexes) == {"F", "M"}
    monkeypatch.setenv(shared.SHARED_DATA_ENV, str(tmp_path))
    with pytest.raises(UserError, match="the COVID-19 CXR set .* is not there; set MEDSYNGAN_SHARED_DATA"):
        load_training_data(load_config("public-covid64", ["data.size=32", "model.resolution=32"]))
