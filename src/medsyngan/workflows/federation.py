"""A federated run on this machine: virtual hospitals on Flower's Simulation Engine."""

from __future__ import annotations

from medsyngan.config import Config
from medsyngan.rundir import RunDir


def train_federated(cfg: Config, run_dir: RunDir, resume: bool = False) -> None:
    from medsyngan.federated.run import run_federated

    run_federated(cfg, run_dir, resume)
