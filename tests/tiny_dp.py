"""A tiny DCGAN configuration and random images for the DP tests (test_dp.py, test_privacy_moments.py)."""

from __future__ import annotations

import numpy as np

from medsyngan.config import load_config

SIZE = 32


def tiny_cfg(*overrides: str):
    # float32, as enable_dp makes every private trainer; tests that build engines by hand need it explicitly.
    return load_config(None, [
        "model.arch=dcgan", f"model.resolution={SIZE}", f"data.size={SIZE}", "model.ngf=8", "model.ndf=8",
        "model.dp_compatible=true", "train.batch_size=8", "model.z_dim=16", "train.amp=off", *overrides,
    ])


def random_images(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
