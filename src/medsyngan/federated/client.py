"""The hospital's request handling, behind the thin Flower ClientApp.

A hospital learns who it is from its node configuration: in the Simulation Engine ``partition-id`` (its rows of the
partition file the server names), in the Deployment Engine ``hospital-id`` and ``data-path`` (its own prepared
dataset; nothing about it is known to the server). ``state-dir`` (optional) is where it keeps its own state on disk,
``state-key`` (optional) the key file that seals it, ``aggregator-public`` (optional) the aggregator's key it pins,
``policy`` (optional) its privacy policy file (:mod:`~medsyngan.federated.policy`; without one a deployed hospital
holds the product defaults, a virtual one the configuration's ``[hospital]`` section).

State across rounds: Flower's ``context.state`` holds the latest state (optimizer moments, loader position, RNG,
local D); a copy per completed round is written atomically to the hospital's disk so that a federation killed and
resumed continues from exactly the state of the last round the server completed. The DP session lives apart, in
the hospital's privacy ledger (:class:`FileLedger`), which is never rolled back; the last training reply is kept
too, so that an identical repeated request is answered with it instead of spending privacy again.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsyngan.config import Config, HospitalSection, config_from_toml_text
from medsyngan.data.api import load_training_data, select_split
from medsyngan.data.partition import read_partition_csv
from medsyngan.data.prepared import PreparedDataset
from medsyngan.errors import UserError
from medsyngan.federated.hospital import Hospital
from medsyngan.federated.policy import load_policy
from medsyngan.federated.protocol import Instruction, Job
from medsyngan.federated.records import pack_blob, unpack_blob
from medsyngan.federated.plan import split_holdout
from medsyngan.rundir import atomic_write_bytes
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
    policy: HospitalSection | None = None  # a deployed hospital's own policy; None: a virtual hospital's
    run_id: str = ""  # the federation's run id, bound into every file the hospital seals

    def policy_for(self, cfg: Config) -> HospitalSection:
        """The policy this hospital holds: its own (deployment) or the configuration's [hospital] (simulation)."""
        return self.policy if self.policy is not None else cfg.hospital

    def binding(self, round_: int, role: str) -> Binding:
        """Where a file this hospital seals belongs (``role``: "state", "ledger", …): its run, its round and
        this hospital, so that a sealed file of another run, round, hospital or role is refused."""
        return Binding(self.run_id, round_, f"hospital-{self.hospital_id}/{role}")


def node_identity(node_config: Mapping[str, Any], job: Job) -> NodeIdentity:
    policy = None
    if "hospital-id" in node_config:
        if "data-path" not in node_config:
            raise UserError("node config has hospital-id but no data-path; start flower-supernode with "
                            "--node-config \"hospital-id=K data-path='DIR'\"")
        if "aggregator-public" not in node_config:
            raise UserError("node config has hospital-id but no aggregator-public: a deployed hospital sends updates "
                            "only to the aggregator whose key it pins; start it with `medsyngan hospital start`")
        hospital, data_path = int(node_config["hospital-id"]), str(node_config["data-path"])
        # Never the aggregator's: a deployed hospital's policy is its own file, or the product defaults.
        policy = load_policy(str(node_config["policy"])) if node_config.get("policy") else HospitalSection()
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
                        Path(str(pinned)) if pinned else None, policy, job.run_id)


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

    def hospital(self, identity: NodeIdentity, job: Job, round_: int | None = None) -> Hospital:
        """This node's hospital for an instruction of ``job`` (in ``round_``); PolicyRefusal when its policy
        refuses the instruction."""
        from medsyngan.federated.policy import check

        config_text = job.config
        cfg = config_from_toml_text(config_text, "federation config")
        policy = identity.policy_for(cfg)
        check(policy, cfg, identity.hospital_id, round_)
        if cfg.privacy.dp and identity.state_key is None:
            # The ledger holds the secret sampling and noise seeds: with them D's noise can be rebuilt.
            raise UserError(f"hospital {identity.hospital_id} trains with DP but has no state key to seal its secret "
                            "seeds with; create one (`medsyngan privacy keygen FILE`) and set state-key=FILE in "
                            "--node-config")
        key = (hashlib.sha256(config_text.encode()).hexdigest(), str(identity.data_path), identity.hospital_id)
        if key not in self._data:
            self._data = {key: load_hospital_data(identity, job, cfg)}
        train, holdout = self._data[key]
        # Fixed per configuration (not whatever the worker process inherited), so reruns compute identically.
        torch.set_num_threads(cfg.run.threads or cfg.federated.client_cpus)
        return Hospital(cfg, identity.hospital_id, train, holdout, policy=policy)


def state_file(identity: NodeIdentity, round_: int) -> Path:
    return identity.state_dir / f"round-{round_:05d}.pt"


def ledger_file(identity: NodeIdentity) -> Path:
    """The hospital's privacy ledger: its DP session (accountant, secret streams' positions, releases)."""
    return identity.state_dir / "privacy-ledger.json"


def reply_file(identity: NodeIdentity) -> Path:
    """The hospital's last training reply, with the digest of the instruction it answered."""
    return identity.state_dir / "last-reply.pt"


def _read_sealed(identity: NodeIdentity, path: Path, binding: Binding) -> bytes:
    blob = path.read_bytes()
    if not is_encrypted(blob):
        return blob
    if identity.state_key is None:
        raise UserError(f"{path} is encrypted; give hospital {identity.hospital_id} its key file "
                        "(node config state-key=FILE, or privacy.checkpoint_key in a simulation)")
    try:
        return decrypt_at_rest(blob, identity.state_key, binding)
    except IntegrityError as exc:
        raise UserError(f"{path}: {exc}; check the hospital's state-key") from None


def _write_sealed(identity: NodeIdentity, path: Path, blob: bytes, binding: Binding) -> None:
    if identity.state_key is not None:
        blob = encrypt_at_rest(blob, identity.state_key, binding)
    atomic_write_bytes(path, blob)


class FileLedger:
    """The hospital's privacy ledger on its disk: JSON, sealed with its state key when it has one, written
    atomically and fsync'd (:func:`~medsyngan.rundir.atomic_write_bytes`) before every charge takes effect."""

    def __init__(self, identity: NodeIdentity):
        self.identity, self.path = identity, ledger_file(identity)
        self.name = str(self.path)

    def read(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = json.loads(_read_sealed(self.identity, self.path, self.identity.binding(0, "ledger")))
            if not isinstance(state, dict) or "accountant" not in state:
                raise ValueError("no accountant")
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"the privacy ledger {self.path} is damaged ({exc}); restore it from the hospital's "
                            "backup — without it the privacy this hospital already spent is unknown, so it "
                            "cannot train") from None
        return state

    def write(self, state: dict) -> None:
        _write_sealed(self.identity, self.path, json.dumps(state).encode(), self.identity.binding(0, "ledger"))


def restore(hospital: Hospital, identity: NodeIdentity, resume_round: int, in_memory: tuple[int, dict] | None) -> None:
    """Bring the hospital to its state after ``resume_round`` (0: fresh), from ``context.state`` or its disk copy,
    and give it its ledger (which holds its DP session, whatever round it resumes)."""
    hospital.ledger = FileLedger(identity)
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
        state = _unpack_state(identity, path, resume_round)
    if state is not None:
        try:
            hospital.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"hospital state for round {resume_round} does not fit this hospital ({exc}); restore "
                            f"{state_file(identity, resume_round)} from the hospital's backup") from None
    if hospital.cfg.privacy.dp and resume_round and not hospital.ledger.path.is_file():
        raise UserError(f"hospital {identity.hospital_id} has state for round {resume_round} but no privacy ledger "
                        f"({hospital.ledger.path}); restore the ledger from the hospital's backup — without it the "
                        "privacy it already spent is unknown")


def _unpack_state(identity: NodeIdentity, path: Path, round_: int) -> dict:
    """A round state from disk; a truncated or garbled file is a UserError naming it, not a pickling traceback."""
    blob = _read_sealed(identity, path, identity.binding(round_, "state"))
    try:
        state = unpack_blob(blob)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"hospital state file {path} is damaged ({type(exc).__name__}); restore it from the "
                        "hospital's backup, or resume the federation from a round this hospital still has") from None
    if not isinstance(state, dict):
        raise UserError(f"hospital state file {path} holds no hospital state; restore it from the hospital's backup")
    return state


def persist(hospital: Hospital, identity: NodeIdentity, round_: int) -> dict:
    """Write the state after ``round_`` to disk (atomically, keeping the last few rounds) and return it. The DP
    session is not in it: its ledger was written at every charge."""
    state = hospital.state_dict()
    _write_sealed(identity, state_file(identity, round_), pack_blob(state), identity.binding(round_, "state"))
    for old in sorted(identity.state_dir.glob("round-*.pt"))[:-KEEP_ROUNDS]:
        old.unlink(missing_ok=True)
    return state


def instruction_digest(instruction: Instruction) -> str:
    """SHA-256 of everything an instruction says: job, round terms and weights (an exact repeat has the same)."""
    from medsyngan.federated.transport import tensors_hash

    digest = hashlib.sha256(instruction.job.to_json().encode())
    if instruction.round is not None:
        for key, value in sorted(instruction.round.to_record().items()):
            digest.update(repr((key, value)).encode())
    if instruction.weights is not None:
        digest.update(tensors_hash(instruction.weights))
    return digest.hexdigest()


def cached_reply(identity: NodeIdentity, digest: str) -> tuple[bytes | dict, dict[str, float]] | None:
    """(payload, metrics) of the last training reply when it answered the instruction with this digest."""
    path = reply_file(identity)
    if not path.is_file():
        return None
    try:
        kept = unpack_blob(_read_sealed(identity, path, identity.binding(0, "reply")))
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError):
        return None  # a damaged copy only costs the replay: the request is then computed (and charged) anew
    if not isinstance(kept, dict) or kept.get("digest") != digest:
        return None
    return kept["payload"], kept["metrics"]


def keep_reply(identity: NodeIdentity, digest: str, payload: bytes | dict, metrics: Mapping[str, float]) -> None:
    _write_sealed(identity, reply_file(identity), pack_blob({"digest": digest, "payload": payload,
                                                             "metrics": dict(metrics)}), identity.binding(0, "reply"))
