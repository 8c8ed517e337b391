"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NIH_DIR = Path(os.environ.get("MEDSYNGAN_NIH_DIR", REPO.parent / "shared" / "data" / "nih-chestxray14"))


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
def nih_dir() -> Path:
    if not (NIH_DIR / "Data_Entry_2017_v2020.csv").is_file():
        pytest.skip(f"NIH ChestX-ray14 sample not found at {NIH_DIR} (set MEDSYNGAN_NIH_DIR)")
    return NIH_DIR
