"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medsyngan.data.shared import NIH_ENV, SHARED_DATA_ENV, covid_cxr_dir, nih_sample_dir


# Under pytest-xdist each worker takes its share of the cores, and so do the CLI subprocesses it starts (torch reads
# OMP_NUM_THREADS): two workers with two threads each on a 2-core machine wait for each other.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    # The metrics' classifiers train at a fixed count of their own (2 by default); in the suite, at the worker's.
    os.environ.setdefault("MEDSYNGAN_TRAINING_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """Slow integration tests first, so that with several workers the long ones run side by side and the short
    ones fill the gaps, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def in_ci() -> bool:
    """CI services set CI (GitHub Actions and GitLab to "true"); there a test must not skip for want of data."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def medsyngan_cache(tmp_path_factory):
    """One cache folder (built phantoms, feature statistics) for the whole session, never the user's own."""
    path = tmp_path_factory.mktemp("medsyngan-cache")
    previous = os.environ.get("MEDSYNGAN_CACHE")
    os.environ["MEDSYNGAN_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MEDSYNGAN_CACHE", None)
    else:
        os.environ["MEDSYNGAN_CACHE"] = previous


@pytest.fixture(scope="session")
def nih_sample() -> Path | None:
    """The real NIH sample (metadata CSV and images-64/), or None where it is missing and the test can do without.
    Under CI a missing sample fails every test that asks for it, so that a green run has run them all."""
    path = nih_sample_dir()
    if (path / "Data_Entry_2017_v2020.csv").is_file() and (path / "images-64").is_dir():
        return path
    if in_ci():
        pytest.fail(f"NIH ChestX-ray14 sample not found at {path}, and CI is set: provide it (set {NIH_ENV} or "
                    f"{SHARED_DATA_ENV})", pytrace=False)
    return None


@pytest.fixture(scope="session")
def nih_dir(nih_sample) -> Path:
    """The real NIH sample; a test that needs it is skipped where it is missing (and fails under CI)."""
    if nih_sample is None:
        pytest.skip(f"NIH ChestX-ray14 sample not found at {nih_sample_dir()} (set {NIH_ENV} or {SHARED_DATA_ENV})")
    return nih_sample


@pytest.fixture(scope="session")
def covid_dir() -> Path:
    """The public COVID-19 CXR set (labels.csv, images/); a test that needs it is skipped where it is missing and
    fails under CI, as the NIH sample's tests do."""
    path = covid_cxr_dir()
    if (path / "labels.csv").is_file():
        return path
    if in_ci():
        pytest.fail(f"COVID-19 CXR set not found at {path}, and CI is set: provide it (set {SHARED_DATA_ENV})",
                    pytrace=False)
    pytest.skip(f"COVID-19 CXR set not found at {path} (set {SHARED_DATA_ENV})")
