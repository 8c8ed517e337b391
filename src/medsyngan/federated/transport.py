"""End-to-end encryption of updates between a hospital and the aggregator, on top of
:mod:`medsyngan.privacy.crypto`: which aggregator key a hospital trusts (pinned or announced), sealing an update
for one round, and the aggregator's round keys and opening."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from medsyngan.config import PrivacySection
from medsyngan.errors import UserError
from medsyngan.federated.protocol import Job, RoundInstruction
from medsyngan.privacy.crypto import (HospitalSession, IntegrityError, UpdateReceiver, load_identity_key,
                                     load_public_key)


def tensors_hash(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 of a set of named tensors in key order: the global model an encrypted update is bound to."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + b"\0")
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.digest()


def trusted_aggregator_key(job: Job, pinned_path: Path | None) -> X25519PublicKey:
    """The aggregator's identity key as this hospital trusts it: the pinned file from `pki init` when the node has
    one (a relay cannot substitute it), else the key announced in the job (simulation, one machine)."""
    if pinned_path is not None:
        pinned = load_public_key(pinned_path)
        if job.aggregator_public is not None and job.aggregator_public != pinned.public_bytes_raw():
            raise UserError(f"the aggregator announced a key that differs from the pinned {pinned_path}; refusing "
                            "to send updates (check that this node talks to the right SuperLink)")
        return pinned
    if job.aggregator_public is None:
        raise UserError("updates must be encrypted but no aggregator key is known; set aggregator-public in "
                        "--node-config to the file from `medsyngan pki init`")
    return X25519PublicKey.from_public_bytes(job.aggregator_public)


def seal_update(payload: bytes, job: Job, round_: RoundInstruction, hospital: int, global_hash: bytes,
                pinned_path: Path | None = None) -> bytes:
    """AES-256-GCM to the aggregator: its identity key and this round's key, with a fresh session key."""
    if round_.round_public is None:
        raise UserError(f"round {round_.round}: updates must be encrypted but the aggregator sent no round key")
    identity = trusted_aggregator_key(job, pinned_path)
    session = HospitalSession(identity, job.run_id, str(hospital), round_.round, round_.round_public)
    return session.seal(payload, global_hash)


class AggregatorTransport:
    """The aggregator's end of the update encryption: round keys out, sealed updates in (or plain passthrough)."""

    def __init__(self, privacy: PrivacySection, run_id: str, identity_key_path: str | None):
        self.receiver: UpdateReceiver | None = None
        if privacy.encrypt:
            if identity_key_path is None:
                raise UserError("privacy.encrypt needs the aggregator's identity key (medsyngan pki init writes it)")
            self.receiver = UpdateReceiver(load_identity_key(identity_key_path), run_id)

    @property
    def identity_public(self) -> bytes | None:
        return self.receiver.identity_public if self.receiver is not None else None

    def round_public(self, round_: int) -> bytes | None:
        return self.receiver.round_public(round_) if self.receiver is not None else None

    def open(self, payload: bytes | dict[str, torch.Tensor], hospital: int, round_: int,
             global_hash: bytes) -> bytes | dict[str, torch.Tensor]:
        """The update as sent before sealing; raises IntegrityError for anything that does not authenticate."""
        if self.receiver is None:
            return payload
        if not isinstance(payload, bytes):
            raise IntegrityError("malformed", f"hospital {hospital} sent an unencrypted update; privacy.encrypt is on")
        return self.receiver.open(payload, hospital_id=str(hospital), round_=round_, global_model_hash=global_hash)

    def close_round(self, round_: int) -> None:
        if self.receiver is not None:
            self.receiver.close_round(round_)
