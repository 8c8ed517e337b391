"""The hospital's request handling, behind the thin Flower ClientApp.

A hospital learns who it is from its node configuration: in the Simulation Engine ``partition-id`` (its rows of the
partition file the server names), in the Deployment Engine ``hospital-id`` and ``data-path`` (its own prepared
dataset; nothing about it is known to the server). ``state-dir`` (optional) is where it keeps its own state on disk,
``state-key`` (optional) the key file that seals it, ``aggregator-public`` (optional) the aggregator's key it pins.

State across rounds: Flower's ``context.state`` holds the latest state (optimizer moments, loader position, RNG,
local D); a copy per completed round is written atomically to the hospital's disk so that a federation killed and
resumed continues from exactly the state of the last round the server completed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyngan.config import Config, config_from_toml_text
from medsyngan.data.api import load_training_data, select_split
from medsyngan.data.partition import read_partition_csv
from medsyngan.data.prepared import PreparedDataset
from medsyngan.errors import UserError
from medsyngan.federated.hospital import Hospital
from medsyngan.federated.protocol import Job
from medsyngan.federated.records import pack_blob, unpack_blob
from medsyngan.federated.plan import split_holdout
from medsyngan.rundir import atomic_write_bytes, atomic_write_text
from medsyngan.sealed import Binding, IntegrityError, decrypt_at_rest, encrypt_at_rest, is_encrypted, load_key_file
from medsyngan.runtime import cache_dir

KEEP_ROUNDS = 2


@dataclass(frozen=True)
class NodeIdentity:
    hospital_id: int
    data_path: str | None
    state_dir: Path
    state_key: bytes | None = None  # seals the round state on disk (AES-256-GCM); None: plaintext
    aggregator_public: Path | None = None  # the aggregator's key a deployed hospital pins; None (simulation): the job's
    run_id: str = ""  # the federation's run id, bound into every file the hospital seals

    def binding(self, round_: int, role: str) -> Binding:
        """Where a file this hospital seals belongs (``role``: "state", "ledger", …): its run, its round and
        this hospital, so that a sealed file of another run, round, hospital or role is refused."""
        return Binding(self.run_id, round_, f"hospital-{self.hospital_id}/{role}")


def node_identity(node_config: Mapping[str, Any], job: Job) -> NodeIdentity:
    if "hospital-id" in node_config:
        if "data-path" not in node_config:
            raise UserError("node config has hospital-id but no data-path; start flower-supernode with "
                            "--node-config \"hospital-id=K data-path='DIR'\"")
        if "aggregator-public" not in node_config:
            raise UserError("node config has hospital-id but no aggregator-public: a deployed hospital sends updates "
                            "only to the aggregator whose key it pins; start it with `medsyngan hospital start`")
        hospital, data_path = int(node_config["hospital-id"]), str(node_config["data-path"])
    elif "partition-id" in node_config:
        hospital, data_path = int(node_config["partition-id"]), None
    else:
        raise UserError("node config names no hospital: set hospital-id and data-path in --node-config")
    # Simulation: the server names a folder in its run directory; deployment: the hospital's own setting.
    default_dir = job.state_dir or Path(cache_dir()) / "hospital-state" / job.run_id
    state_dir = Path(str(node_config.get("state-dir", default_dir))) / f"hospital-{hospital}"
    # A deployed hospital seals its state with its own key file (node config state-key); a virtual hospital, which
    # lives in the server's run directory, with the run's checkpoint key (job state_key, simulation only).
    key_path = node_config.get("state-key") or job.state_key
    pinned = node_config.get("aggregator-public")
    return NodeIdentity(hospital, data_path, state_dir, load_key_file(str(key_path)) if key_path else None,
                        Path(str(pinned)) if pinned else None, job.run_id)


def load_hospital_data(identity: NodeIdentity, job: Job, cfg: Config) -> tuple[PreparedDataset, PreparedDataset]:
    """(train, held-out) images of this hospital, patient-disjoint."""
    if identity.data_path is not None:
        own = select_split(PreparedDataset.open(identity.data_path), cfg.data.split, identity.data_path)
    else:
        # Virtual hospitals share the server's disk: the same configuration gives the same dataset.
        if job.partition is None:
            raise UserError(f"node config names virtual hospital {identity.hospital_id} but the job names no "
                            "partition file; start a simulation with `medsyngan train` or mode = 'simulation'")
        dataset = load_training_data(cfg)
        assignment = read_partition_csv(job.partition, dataset)
        rows = [i for i, h in enumerate(assignment) if h == identity.hospital_id]
        if not rows:
            raise UserError(f"partition {job.partition} gives hospital {identity.hospital_id} no images")
        own = dataset.subset(rows)
    train_rows, holdout_rows = split_holdout(own.patients, cfg.data.seed, identity.hospital_id,
                                             cfg.federated.holdout_fraction)
    return own.subset(train_rows), own.subset(holdout_rows)


class HospitalRuntime:
    """Builds this node's hospital for each request; the data is read once per process and kept.

    The trainer is rebuilt from the configuration for every message and then given its persisted state, so a
    request never sees state left behind by an earlier, abandoned attempt in the same (possibly shared) process.
    """

    def __init__(self) -> None:
        self._data: dict[tuple[str, str, int], tuple[PreparedDataset, PreparedDataset]] = {}

    def hospital(self, identity: NodeIdentity, job: Job) -> Hospital:
        config_text = job.config
        cfg = config_from_toml_text(config_text, "federation config")
        key = (hashlib.sha256(config_text.encode()).hexdigest(), str(identity.data_path), identity.hospital_id)
        if key not in self._data:
            self._data = {key: load_hospital_data(identity, job, cfg)}
        train, holdout = self._data[key]
        # Fixed per configuration (not whatever the worker process inherited), so reruns compute identically.
        torch.set_num_threads(cfg.run.threads or cfg.federated.client_cpus)
        return Hospital(cfg, identity.hospital_id, train, holdout)


def state_file(identity: NodeIdentity, round_: int) -> Path:
    return identity.state_dir / f"round-{round_:05d}.pt"


def ledger_file(identity: NodeIdentity) -> Path:
    """The hospital's running privacy ledger: the accountant after its latest training, whatever the server kept.

    A round the server discarded (a late reply, a failed quorum) still spent privacy; restoring an older snapshot
    must not forget it, so a restored hospital's accountant never holds fewer steps than the ledger."""
    return identity.state_dir / "privacy-ledger.json"


def restore(hospital: Hospital, identity: NodeIdentity, resume_round: int, in_memory: tuple[int, dict] | None) -> None:
    """Bring the hospital to its state after ``resume_round`` (0: fresh), from ``context.state`` or its disk copy."""
    if in_memory is not None and in_memory[0] == resume_round:
        state = in_memory[1]
    elif resume_round == 0:
        state = None
    else:
        path = state_file(identity, resume_round)
        if not path.is_file():
            raise UserError(
                f"hospital {identity.hospital_id} has no saved state for round {resume_round} ({path}); "
                "it cannot resume this federation"
            )
        state = unpack_blob(_open_state(identity, path, resume_round))
    if state is not None:
        hospital.load_state_dict(state)
    ledger = ledger_file(identity)
    if ledger.is_file():
        hospital.privacy_floor = json.loads(ledger.read_text())


def _open_state(identity: NodeIdentity, path: Path, round_: int) -> bytes:
    blob = path.read_bytes()
    if not is_encrypted(blob):
        return blob
    if identity.state_key is None:
        raise UserError(f"{path} is encrypted; give hospital {identity.hospital_id} its key file "
                        "(node config state-key=FILE, or privacy.checkpoint_key in a simulation)")
    try:
        return decrypt_at_rest(blob, identity.state_key, identity.binding(round_, "state"))
    except IntegrityError as exc:
        raise UserError(f"{path}: {exc}; check the hospital's state-key") from None


def persist(hospital: Hospital, identity: NodeIdentity, round_: int) -> dict:
    """Write the state after ``round_`` to disk (atomically, keeping the last few rounds) and return it."""
    state = hospital.state_dict()
    blob = pack_blob(state)
    if identity.state_key is not None:
        blob = encrypt_at_rest(blob, identity.state_key, identity.binding(round_, "state"))
    atomic_write_bytes(state_file(identity, round_), blob)
    if state.get("dp") is not None:
        atomic_write_text(ledger_file(identity), json.dumps(state["dp"]["accountant"]))
    for old in sorted(identity.state_dir.glob("round-*.pt"))[:-KEEP_ROUNDS]:
        old.unlink(missing_ok=True)
    return state
