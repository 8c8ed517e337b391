"""A tiny centralized DP run on phantoms (40 patients, 2 films each), for the tests of what a DP run writes
(test_dp_secrets.py, test_export.py)."""

from __future__ import annotations

from pathlib import Path

from medsyngan.config import load_config
from medsyngan.rundir import RunDir

SIZE = 32
DP_RUN = ["run.device=cpu", "model.arch=dcgan", f"model.resolution={SIZE}", f"data.size={SIZE}", "model.ngf=8",
          "model.ndf=8", "model.dp_compatible=true", "model.z_dim=16", "train.batch_size=8", "train.amp=off",
          "privacy.dp=true", "privacy.target_epsilon=5", "data.phantom_patients=40",
          "data.phantom_images_per_patient=2", "train.log_every=1", "train.sample_every=100",
          "train.checkpoint_every=2", "train.steps=3"]
MODEL_ONLY = DP_RUN[:10]  # the model and device settings, without DP


def train_dp_run(root: Path, *extra: str, resume: bool = False) -> RunDir:
    """Train (or resume) the tiny DP run, with ``extra`` overrides, in ``root``."""
    from medsyngan.workflows.centralized import train_centralized

    cfg = load_config("dcgan64", DP_RUN + list(extra))
    run = RunDir(root).create(cfg, resume=resume)
    train_centralized(cfg, run, resume=resume)
    return run
