"""AES-256-GCM end to end between each hospital and the aggregator.

Key agreement (one fresh key per hospital, round and session)::

    aggregator: identity key S (long-lived; its public half is pinned at every hospital by `pki init`)
                round key R_r (ephemeral, one per round, public half sent with the round's instructions)
    hospital:   session key E (ephemeral, fresh for every round it answers)
    IKM   = X25519(E, S) || X25519(E, R_r)
    key   = HKDF-SHA256(IKM, salt = run id, info = version | round | hospital | E.pub | R_r.pub)

X25519(E, S) authenticates the aggregator: a relay (the SuperLink) that swaps R_r for its own key still lacks
S and cannot derive the key. X25519(E, R_r) gives forward secrecy: once the aggregator deletes R_r at the end of
the round (:meth:`UpdateReceiver.close_round`), a later theft of S does not decrypt stored traffic.

Nonces: the key is unique to one hospital session (fresh E), and within it a counter numbers the messages
(nonce = 4 zero bytes | 64-bit counter). A (key, nonce) pair therefore never repeats — a counter rather than a
random nonce because it is guaranteed, not just overwhelmingly likely, and because the receiver can use it to
refuse replays. A hospital process that restarts makes a new E, hence a new key, so a reset counter is safe.

Associated data binds version, run id, round, hospital id, the SHA-256 of the global model the update was
computed from, and both ephemeral public keys. The receiver builds it from what it EXPECTS, not from the header,
so a message moved to another hospital, round, run or model fails authentication even if its header is edited.

Hospital authentication (is this message really from hospital 3?) comes from Flower's SuperNode authentication;
the transport layer here protects confidentiality and integrity against the relay.

Encryption at rest (checkpoints under a key file) lives in :mod:`medsyngan.sealed`, below training in the layers;
its functions are re-exported here so that the privacy API is found in one place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medsyngan.errors import UserError
from medsyngan.rundir import atomic_write_bytes
from medsyngan.sealed import (  # noqa: F401 - the at-rest names are re-exported
    KEY_BYTES,
    Binding,
    IntegrityError,
    decrypt_at_rest,
    encrypt_at_rest,
    generate_key_file,
    is_encrypted,
    load_key_file,
    read_key_bytes,
)

log = logging.getLogger("medsyngan.privacy.crypto")

PROTOCOL_VERSION = 1
_SEALED_MAGIC = b"MSGE"
_HEADER = struct.Struct("<4sBQ32s32s32s12sH")  # magic, version, round, model hash, E.pub, R.pub, nonce, id len


def _reject(reason: str, message: str) -> IntegrityError:
    log.warning("rejected: %s (%s)", message, reason)
    return IntegrityError(reason, message)


def serialized_model_hash(data: bytes) -> bytes:
    """SHA-256 of the serialized global model an update was computed from (bound into the ciphertext)."""
    return hashlib.sha256(data).digest()


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes_raw()


def _derive(ikm: bytes, run_id: str, round_: int, hospital_id: str, e_pub: bytes, r_pub: bytes) -> bytes:
    info = (b"medsyngan-update" + struct.pack("<BQ", PROTOCOL_VERSION, round_) + _lp(hospital_id.encode())
            + e_pub + r_pub)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=run_id.encode(), info=info).derive(ikm)


def _lp(data: bytes) -> bytes:
    """Length-prefixed, so that concatenated fields cannot be re-split differently."""
    return struct.pack("<I", len(data)) + data


def _associated_data(run_id: str, round_: int, hospital_id: str, mhash: bytes, e_pub: bytes, r_pub: bytes) -> bytes:
    return (_SEALED_MAGIC + struct.pack("<BQ", PROTOCOL_VERSION, round_) + _lp(run_id.encode())
            + _lp(hospital_id.encode()) + mhash + e_pub + r_pub)


@dataclass(frozen=True)
class SealedHeader:
    version: int
    round: int
    model_hash: bytes
    session_public: bytes
    round_public: bytes
    nonce: bytes
    hospital_id: str


def parse_sealed(data: bytes) -> tuple[SealedHeader, bytes]:
    """Split a sealed message into its header and ciphertext (nothing is verified here)."""
    try:
        magic, version, round_, mhash, e_pub, r_pub, nonce, id_len = _HEADER.unpack_from(data)
        hid = data[_HEADER.size:_HEADER.size + id_len].decode()
    except (struct.error, UnicodeDecodeError):
        raise _reject("malformed", "sealed update is truncated or not a MedSynGAN message") from None
    if magic != _SEALED_MAGIC:
        raise _reject("malformed", "sealed update has a bad magic number")
    return SealedHeader(version, round_, mhash, e_pub, r_pub, nonce, hid), data[_HEADER.size + id_len:]


class HospitalSession:
    """One hospital's sender for one round: a fresh ephemeral key and a message counter."""

    def __init__(self, aggregator_identity: X25519PublicKey, run_id: str, hospital_id: str, round_: int,
                 round_public: bytes):
        if len(round_public) != KEY_BYTES:
            raise ValueError("the aggregator's round key must be 32 bytes")
        self.run_id, self.hospital_id, self.round = run_id, str(hospital_id), int(round_)
        self._round_public = round_public
        ephemeral = X25519PrivateKey.generate()
        self._e_pub = _raw(ephemeral.public_key())
        round_key = X25519PublicKey.from_public_bytes(round_public)
        ikm = ephemeral.exchange(aggregator_identity) + ephemeral.exchange(round_key)
        self._aead = AESGCM(_derive(ikm, run_id, self.round, self.hospital_id, self._e_pub, round_public))
        self._counter = 0

    def seal(self, plaintext: bytes, global_model_hash: bytes) -> bytes:
        if len(global_model_hash) != 32:
            raise ValueError("global_model_hash must be a SHA-256 digest (32 bytes)")
        if self._counter >= 2**64:
            raise RuntimeError("message counter exhausted; start a new session")
        nonce = b"\0\0\0\0" + struct.pack("<Q", self._counter)
        self._counter += 1
        ad = _associated_data(self.run_id, self.round, self.hospital_id, global_model_hash, self._e_pub,
                              self._round_public)
        hid = self.hospital_id.encode()
        header = _HEADER.pack(_SEALED_MAGIC, PROTOCOL_VERSION, self.round, global_model_hash, self._e_pub,
                              self._round_public, nonce, len(hid)) + hid
        return header + self._aead.encrypt(nonce, plaintext, ad)


class UpdateReceiver:
    """The receiving end: round keys, expected-context checks, replay refusal, decryption."""

    def __init__(self, identity: X25519PrivateKey, run_id: str):
        self._identity = identity
        self.run_id = run_id
        self._round_keys: dict[int, X25519PrivateKey] = {}
        self._seen: set[tuple[str, int, bytes, bytes]] = set()

    @property
    def identity_public(self) -> bytes:
        return _raw(self._identity.public_key())

    def round_public(self, round_: int) -> bytes:
        """The round's ephemeral public key to send to hospitals (created on first request)."""
        if round_ not in self._round_keys:
            self._round_keys[round_] = X25519PrivateKey.generate()
        return _raw(self._round_keys[round_].public_key())

    def close_round(self, round_: int) -> None:
        """Forget the round key (forward secrecy) and the round's replay records; later messages are refused."""
        self._round_keys.pop(round_, None)
        self._seen = {s for s in self._seen if s[1] != round_}

    def open(self, sealed: bytes, *, hospital_id: str, round_: int, global_model_hash: bytes) -> bytes:
        """Decrypt one hospital's update for this round, or raise :class:`IntegrityError` (and log a line)."""
        hospital_id = str(hospital_id)
        header, ciphertext = parse_sealed(sealed)
        where = f"update claimed by hospital {header.hospital_id!r} for round {header.round}"
        if header.version != PROTOCOL_VERSION:
            raise _reject("malformed", f"{where}: protocol version {header.version}, expected {PROTOCOL_VERSION}")
        if header.hospital_id != hospital_id:
            raise _reject("wrong-hospital", f"{where} arrived from hospital {hospital_id!r}")
        if header.round != round_:
            raise _reject("wrong-round", f"{where} arrived in round {round_}")
        if header.model_hash != global_model_hash:
            raise _reject("wrong-model", f"{where} was computed from another global model")
        key = self._round_keys.get(round_)
        if key is None or header.round_public != _raw(key.public_key()):
            raise _reject("unknown-round-key", f"{where} uses a round key this aggregator did not issue or has closed")
        replay_id = (hospital_id, round_, header.session_public, header.nonce)
        if replay_id in self._seen:
            raise _reject("replay", f"{where} is a replay of a message already received")
        try:
            session = X25519PublicKey.from_public_bytes(header.session_public)
            ikm = self._identity.exchange(session) + key.exchange(session)
        except ValueError:
            raise _reject("malformed", f"{where} carries an invalid session key") from None
        aead = AESGCM(_derive(ikm, self.run_id, round_, hospital_id, header.session_public, header.round_public))
        ad = _associated_data(self.run_id, round_, hospital_id, global_model_hash, header.session_public,
                              header.round_public)
        try:
            plaintext = aead.decrypt(header.nonce, ciphertext, ad)
        except InvalidTag:
            raise _reject("tampered", f"{where} failed authentication (altered in transit, or another run)") from None
        self._seen.add(replay_id)
        return plaintext


# --- identity keys -----------------------------------------------------------------------------------------

def write_identity_key(path: Path | str) -> bytes:
    """Create the aggregator's X25519 identity key (0600); returns the public key for pinning at hospitals."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists; refusing to overwrite a key (delete it first if it is really unwanted)")
    key = X25519PrivateKey.generate()
    atomic_write_bytes(path, key.private_bytes_raw())
    os.chmod(path, 0o600)
    return _raw(key.public_key())


def load_identity_key(path: Path | str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(read_key_bytes(path, "X25519 private key"))


def load_public_key(path: Path | str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(read_key_bytes(path, "X25519 public key"))
