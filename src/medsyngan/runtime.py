"""Device choice and seeding, shared by every command that runs torch."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from medsyngan.errors import UserError


def select_device(choice: str = "auto") -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device = 'cuda' but no CUDA device is visible; set run.device=auto or cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def cache_dir() -> Path:
    """Where derived data (built phantoms, real-set feature statistics, downloaded weights) is cached."""
    root = os.environ.get("MEDSYNGAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "medsyngan"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
