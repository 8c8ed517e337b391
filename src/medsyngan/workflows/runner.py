"""``train(cfg, run_dir, resume)``: one run, centralized or federated, as its configuration says."""

from __future__ import annotations

from typing import Any

from medsyngan.config import Config
from medsyngan.rundir import RunDir


def train(cfg: Config, run_dir: RunDir, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (created by the caller); returns a summary (step, kimg, interrupted)."""
    if cfg.federated.enabled:
        from medsyngan.workflows.federation import train_federated

        train_federated(cfg, run_dir, resume)
        return {"interrupted": False}
    from medsyngan.workflows.centralized import train_centralized

    return train_centralized(cfg, run_dir, resume)
