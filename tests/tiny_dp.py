"""A tiny DCGAN configuration, random images and a DP session built from a configuration, for the DP tests
(test_dp.py, test_privacy_moments.py)."""

from __future__ import annotations

import numpy as np

from medsyngan.config import Config, load_config
from medsyngan.privacy.accounting import planned_private_steps
from medsyngan.privacy.dp import DPSession, enable_dp
from medsyngan.training.step import GANTrainer

SIZE = 32


def tiny_cfg(*overrides: str):
    # float32, as enable_dp makes every private trainer; tests that build engines by hand need it explicitly.
    return load_config(None, [
        "model.arch=dcgan", f"model.resolution={SIZE}", f"data.size={SIZE}", "model.ngf=8", "model.ndf=8",
        "model.dp_compatible=true", "train.batch_size=8", "model.z_dim=16", "train.amp=off", *overrides,
    ])


def random_images(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)


def enable_dp_from(cfg: Config, trainer: GANTrainer, images: np.ndarray, patients, **kwargs) -> DPSession:
    """``enable_dp`` with the configuration's privacy section, batch size and augmentation, as the workflows call
    it; ``planned_steps`` defaults to the run's plan, like theirs."""
    kwargs.setdefault("planned_steps", planned_private_steps(cfg))
    return enable_dp(trainer, images, patients, cfg.privacy, batch_size=cfg.train.batch_size,
                     augment=cfg.data.augment, **kwargs)
