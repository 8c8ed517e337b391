"""Where the shared real data sets live: the one definition that tests, benchmarks and studies read.

``MEDSYNGAN_SHARED_DATA`` names the folder that holds them; without it, a source checkout looks in
``<checkout>/../shared/data``. ``MEDSYNGAN_NIH_DIR`` points at an NIH sample somewhere else.
"""

from __future__ import annotations

import os
from pathlib import Path

from medsyngan.errors import UserError

SHARED_DATA_ENV = "MEDSYNGAN_SHARED_DATA"
NIH_ENV = "MEDSYNGAN_NIH_DIR"
NIH_FOLDER = "nih-chestxray14"
COVID_CXR_FOLDER = "covid19-cxr-ml-workgroup"


def source_checkout() -> Path | None:
    """The repository this package runs from, or None for an installed package."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "medsyngan").is_dir() else None


def shared_data_dir() -> Path:
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    checkout = source_checkout()
    if checkout is None:
        raise UserError(f"no shared data folder: MedSynGAN is installed, not run from a checkout; set "
                        f"{SHARED_DATA_ENV} to the folder that holds {NIH_FOLDER}/")
    return checkout.parent / "shared" / "data"


def nih_sample_dir() -> Path:
    """The NIH ChestX-ray14 sample (metadata CSV, split lists, images-64/)."""
    return Path(os.environ[NIH_ENV]) if os.environ.get(NIH_ENV) else shared_data_dir() / NIH_FOLDER


def covid_cxr_dir() -> Path:
    """The COVID-19 CXR ML workgroup films."""
    return shared_data_dir() / COVID_CXR_FOLDER
