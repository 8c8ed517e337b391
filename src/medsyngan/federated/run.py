"""`medsyngan train` with federated settings: Flower's Simulation Engine in the foreground.

The server process prepares the dataset and the partition (virtual hospitals share this machine's disk), then
runs the ServerApp and one virtual SuperNode per hospital. Ray is started for this run only and shut down when
it ends, fails or is interrupted, so no background process outlives the command.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsyngan.config import Config, load_config
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text

log = logging.getLogger("medsyngan.federated")
PARTITION_FILE = "partition.csv"


def _run_id(run_dir: RunDir, resume: bool) -> str:
    """A stable id per run directory: HKDF salts and hospital state folders key on it across resumes."""
    path = run_dir.root / "run_id"
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex
    atomic_write_text(path, run_id + "\n")
    return run_id


def simulation_job(cfg: Config, run_dir: RunDir) -> dict[str, Any]:
    """Dataset and partition for virtual hospitals, validated before anything starts."""
    from medsyngan.data.api import load_training_data
    from medsyngan.data.partition import partition, read_partition_csv, write_partition_csv

    f = cfg.federated
    dataset = load_training_data(cfg)
    target = run_dir.root / PARTITION_FILE
    if f.partition:
        assignment = read_partition_csv(f.partition, dataset)
        found = len(set(int(h) for h in assignment))
        if found < f.hospitals:
            raise UserError(
                f"{f.partition} has {found} hospitals but federated.hospitals = {f.hospitals}; "
                "partition again with --hospitals or lower federated.hospitals"
            )
        if Path(f.partition).resolve() != target.resolve():
            write_partition_csv(target, dataset.image_names, dataset.patients, assignment)
    elif not target.is_file():
        assignment = partition(dataset.patients, dataset.labels, f.hospitals, f.scheme, f.alpha, cfg.data.seed)
        write_partition_csv(target, dataset.image_names, dataset.patients, assignment)
    # Virtual hospitals keep their round state in the run directory, sealed with the run's checkpoint key.
    return {"partition": str(target), "state_dir": str(run_dir.root / "hospitals"),
            "state_key": cfg.privacy.checkpoint_key}


def simulation_identity_key(cfg: Config, run_dir: RunDir) -> str | None:
    """In simulation the aggregator's identity key lives in the run directory (0600), made on first use; a real
    deployment takes the one `medsyngan pki init` wrote, whose public half the hospitals pin."""
    if not cfg.privacy.encrypt:
        return None
    from medsyngan.privacy.crypto import write_identity_key

    path = run_dir.root / "keys" / "aggregator_x25519.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_identity_key(path)
    return str(path)


def prepare_federation(
    preset: str | None, overrides: Sequence[str], run_dir: str, resume: bool, simulation: bool
) -> tuple[Config, RunDir, dict[str, Any]]:
    """Configuration, run directory and the static part of every instruction (shared by both launch paths)."""
    rd = RunDir(run_dir)
    cfg = rd.load_config() if resume else load_config(preset, list(overrides))
    rd.create(cfg, resume=resume)
    return cfg, rd, federation_job(cfg, rd, resume, simulation)


def federation_job(cfg: Config, run_dir: RunDir, resume: bool, simulation: bool) -> dict[str, Any]:
    job: dict[str, Any] = {"config": cfg.to_toml(), "run_id": _run_id(run_dir, resume)}
    if simulation:
        job.update(simulation_job(cfg, run_dir))
    return job


def run_federated(cfg: Config, run_dir: RunDir, resume: bool) -> None:
    """Run the whole federation in this process's foreground (Flower Simulation Engine, Ray backend)."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from medsyngan.federated.client_app import app as client_app
    from medsyngan.federated.server_app import make_server_app

    f = cfg.federated
    if f.quorum > f.hospitals:
        raise UserError(f"federated.quorum ({f.quorum}) exceeds federated.hospitals ({f.hospitals})")
    job = federation_job(cfg, run_dir, resume, simulation=True)
    server_app = make_server_app(cfg, run_dir, job, resume, simulation_identity_key(cfg, run_dir))
    cpus = max(1, os.cpu_count() or 1)
    backend = {
        "client_resources": {"num_cpus": min(f.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
    }
    log.info("federation: %d hospitals, %d rounds of %d local steps (%s)", f.hospitals, f.rounds, f.local_steps,
             f.strategy)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=f.hospitals,
                       backend_config=backend)
    except RuntimeError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, UserError):
            raise cause from None
        raise
    finally:
        _shutdown_ray()


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
