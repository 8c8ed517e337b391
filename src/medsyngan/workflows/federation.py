"""A federated run: the federated layer composed with the data and metrics layers and Flower's engines.

:func:`train_federated` is what ``medsyngan train`` runs when ``federated.enabled`` is set: it prepares the job in
the run directory (run id, the partition of the data among virtual hospitals, the aggregator's key), writes it
for the ServerApp, and runs the Flower apps of :mod:`medsyngan.apps` on Flower's supported local simulation
(:mod:`medsyngan.federated.simulation` says why that is not in this process). :func:`server_setup` is what the
ServerApp makes of Flower's run config, for ``medsyngan train`` (a prepared job) and ``flwr run`` (a preset and
overrides, resolved there).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import medsyngan
from medsyngan.config import Config, config_from_toml_text, load_config
from medsyngan.errors import UserError
from medsyngan.federated.protocol import Job, MalformedMessage
from medsyngan.federated.server_app import ServerSetup
from medsyngan.rundir import RunDir, atomic_write_text, console, setup_logging

log = logging.getLogger("medsyngan.federated")

# The Flower app of this package: `[tool.flwr.app]` in pyproject.toml declares the same (a test checks).
APP_COMPONENTS = {"serverapp": "medsyngan.apps:server_app", "clientapp": "medsyngan.apps:client_app"}
APP_CONFIG: dict[str, Any] = {
    "config": "federated-dcgan64",  # preset or TOML file (a run started by `flwr run`)
    "overrides": "",  # space-separated section.key=value
    "run-dir": "runs/flwr",
    "resume": False,
    "mode": "simulation",  # simulation: the server prepares data and partition; deployment: hospitals bring theirs
    "aggregator-key": "",  # the aggregator's X25519 identity key file (needed when updates are encrypted)
    "manifest": "",  # deployment: the PKI manifest, which SuperNode key is which hospital
    "app-signature": "",  # deployment: the federation's signature of the app and this run config (pki sign-app)
    "job": "",  # a job file prepared by `medsyngan train`; when set, config, overrides and mode are not read
}
PARTITION_FILE = "partition.csv"
FLOWER_DIR = "flower"  # in the run directory: the local simulation's Flower home, logs and job file
JOB_FILE = "job.json"


def hospital_metrics(fake_u8: np.ndarray, holdout_u8: np.ndarray) -> Mapping[str, float]:
    """Random-feature FD and KID of the global generator against a hospital's held-out patients."""
    from medsyngan.metrics import evaluate_images

    return evaluate_images(fake_u8, holdout_u8, metrics=["fd", "kid"], kid_subset_size=min(100, len(holdout_u8)))


def _partition(cfg: Config, run_dir: RunDir) -> Path:
    """The partition of the training data among virtual hospitals, in the run directory, validated."""
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
    return target


def prepare_job(cfg: Config, run_dir: RunDir, resume: bool, simulation: bool) -> Job:
    """The static part of every instruction. In simulation the virtual hospitals share this machine: the server
    names their partition, and they keep their round state in the run directory, sealed with the run's
    checkpoint key, or in a DP run without one with the run's own key file (their state holds the DP seed)."""
    from medsyngan.training.checkpoint import run_key_file

    if simulation:
        from medsyngan.federated.policy import check_simulation

        check_simulation(cfg)  # the virtual hospitals' policy is cfg.hospital: refuse a disagreement up front
    # Stable across resumes: HKDF salts, hospital state folders and sealed files key on it.
    run_id = run_dir.run_id() if resume else run_dir.new_run_id()
    if not simulation:
        return Job(config=cfg.to_toml(), run_id=run_id)
    state_key = cfg.privacy.checkpoint_key or (str(run_key_file(run_dir.root).resolve()) if cfg.privacy.dp else None)
    roster = signing_keys = None
    if cfg.privacy.secagg:
        from medsyngan.federated.hospital_keys import simulation_keys

        # Like the aggregator's key: the federation key and each virtual hospital's, in the run directory.
        folder = (run_dir.root / "keys" / "secagg").resolve()
        roster, signing_keys = simulation_keys(folder, cfg.federated.hospitals).to_bytes(), str(folder)
    return Job(config=cfg.to_toml(), run_id=run_id, partition=str(_partition(cfg, run_dir)),
               state_dir=str(run_dir.root / "hospitals"), state_key=state_key, roster=roster, signing_keys=signing_keys)


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


def server_setup(run_config: Mapping[str, Any]) -> ServerSetup:
    """The federation a ServerApp runs, from Flower's run config (keys and defaults: :data:`APP_CONFIG`)."""
    settings = {**APP_CONFIG, **run_config}
    run_dir, resume = RunDir(str(settings["run-dir"])), bool(settings["resume"])
    identity_key = str(settings["aggregator-key"]) or None
    if settings["job"]:
        path = Path(str(settings["job"]))
        try:
            job = Job.from_json(path.read_text())
        except (OSError, MalformedMessage) as exc:
            raise UserError(f"cannot read the job file {path} ({exc}); start the run with `medsyngan train`") from None
        setup_logging(run_dir.log_path)
        return ServerSetup(config_from_toml_text(job.config, str(path)), run_dir, job, resume, identity_key)
    simulation = str(settings["mode"]) == "simulation"
    hospital_keys = None
    if not simulation:
        from medsyngan.federated.hospital_keys import HospitalKeys

        if not settings["manifest"]:
            raise UserError("a deployment needs manifest='PKI/manifest.json' in the run config: it says which "
                            "SuperNode key is which hospital")
        hospital_keys = HospitalKeys.from_manifest(str(settings["manifest"]))
    cfg = run_dir.load_config() if resume else load_config(str(settings["config"]), str(settings["overrides"]).split())
    run_dir.create(cfg, resume=resume)
    job = prepare_job(cfg, run_dir, resume, simulation)
    if not simulation and cfg.privacy.secagg:
        from dataclasses import replace

        from medsyngan.federated.hospital_keys import signed_roster

        job = replace(job, roster=signed_roster(Path(str(settings["manifest"]))).to_bytes())
    if simulation and identity_key is None:
        identity_key = simulation_identity_key(cfg, run_dir)
    return ServerSetup(cfg, run_dir, job, resume, identity_key, hospital_keys)


def _check_before_start(cfg: Config) -> None:
    """What can be refused before any process starts."""
    from medsyngan.federated.update_codec import check_settings
    from medsyngan.models.registry import check_model_section
    from medsyngan.training.checkpoint import checkpoint_key
    from medsyngan.training.schedule import check_run_length

    f = cfg.federated
    if f.quorum > f.hospitals:
        raise UserError(f"federated.quorum ({f.quorum}) exceeds federated.hospitals ({f.hospitals})")
    check_settings(cfg.privacy)
    check_model_section(cfg.model)
    check_run_length(cfg)
    checkpoint_key(cfg)


def train_federated(cfg: Config, run_dir: RunDir, resume: bool = False) -> None:
    """Run the whole federation in the foreground, virtual hospitals on Flower's local simulation (Ray backend);
    returns when the last round is done, raises UserError when the federation stopped early."""
    from medsyngan.federated.simulation import LogFollower, run_local_simulation, write_app

    _check_before_start(cfg)
    job = prepare_job(cfg, run_dir, resume, simulation=True)
    identity_key = simulation_identity_key(cfg, run_dir)
    home = run_dir.root.resolve() / FLOWER_DIR
    atomic_write_text(home / JOB_FILE, job.to_json())
    app = write_app(home / "app", "medsyngan", medsyngan.__version__, APP_COMPONENTS, APP_CONFIG)
    f = cfg.federated
    cpus = max(1, os.cpu_count() or 1)
    federation = {"num-supernodes": f.hospitals, "client-resources-num-cpus": min(f.client_cpus, cpus),
                  "client-resources-num-gpus": 0.0, "init-args-num-cpus": cpus, "init-args-log-to-driver": True}
    run_config = {"run-dir": str(run_dir.root.resolve()), "resume": resume, "aggregator-key": identity_key or "",
                  "job": str(home / JOB_FILE)}
    log.info("federation: %d hospitals, %d rounds of %d local steps (%s); Flower's logs in %s", f.hospitals,
             f.rounds, f.local_steps, f.strategy, home)
    follower = LogFollower(run_dir.log_path,
                           lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    try:
        run_local_simulation(home, app, run_config, federation, follower, env={"RAY_DEDUP_LOGS": "0"})
    except KeyboardInterrupt:
        log.warning("federation stopped; continue it from its last completed round with --resume")
        raise
