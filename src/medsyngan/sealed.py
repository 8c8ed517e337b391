"""Files encrypted at rest: AES-256-GCM under a 32-byte key file, each bound to its run, step and role.

Format of a sealed file (version 2)::

    "MSGC" | 2 | u16 len | run id | u64 step | u16 len | role | nonce (12 random bytes) | AES-256-GCM(data)
    AD = everything before the nonce

The binding (:class:`Binding`) names the run the file belongs to, the step or round it was written at, and what
it is (e.g. "checkpoint/model.safetensors", "hospital-3/state"). It is authenticated, so a file sealed for one
place does not open in another under the same key: an attacker with write access to the disk cannot swap the
optimizer state into the place of the weights, put an older step's file in place of a newer one, or bring a
folder over from another run. The binding travels in clear in the header so that a refusal can say what the file
is (the run id, the step and the role are not secret: folder names and ``RUN/run_id`` show them anyway).

Version 1 files (bound to their role only) are refused: reading them would let exactly those swaps through.

Nonces are random: one long-lived key seals few files (one set per checkpoint), and the chance of a repeated nonce
stays below 2^-32 up to 2^32 files.

This module sits beside ``rundir.py``, below training, so that checkpoints can be sealed without training
importing the privacy layer; ``medsyngan.privacy.crypto`` builds the encryption of updates in transit on it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsyngan.errors import UserError
from medsyngan.rundir import atomic_write_bytes, log

KEY_BYTES = 32
FORMAT_VERSION = 2
MAGIC = b"MSGC"
_HEAD = MAGIC + bytes([FORMAT_VERSION])
_NONCE_BYTES = 12
_LEN = struct.Struct("<H")
_STEP = struct.Struct("<Q")


class IntegrityError(Exception):
    """A message or file failed authentication or does not belong where it arrived; it was not used.

    ``reason`` is one of: tampered, replay, wrong-hospital, wrong-round, wrong-model, unknown-round-key,
    malformed, wrong-key (messages in transit and files at rest), wrong-run, wrong-step, wrong-role (files at
    rest). A message from another run fails as "tampered": the run id is bound only into the key and the
    associated data.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Binding:
    """Where a sealed file belongs: its run id, the step (or round) it was written at, and its role.

    To seal, every field is required. To open, ``run_id`` or ``step`` may be None when the reader has nothing to
    hold the file to (a lone weights file copied out of its run): that field is then not checked, and the file's
    own value can be read with :func:`sealed_binding`.
    """

    run_id: str | None
    step: int | None
    role: str

    def __str__(self) -> str:
        run = "an unknown run" if self.run_id is None else f"run {self.run_id}"
        step = "" if self.step is None else f", step {self.step}"
        return f"{self.role} of {run}{step}"


# --- key files ---------------------------------------------------------------------------------------------------

def read_key_bytes(path: Path | str, what: str) -> bytes:
    """The raw bytes of a 32-byte key file (symmetric key or X25519 key); a missing or wrong-size file is a
    one-line UserError. ``what`` names the kind of key in the message."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"key file {path} not found; create it first (medsyngan privacy keygen / pki init)") from None
    except OSError as exc:
        raise UserError(f"key file {path} cannot be read ({exc.strerror}); check its permissions") from None
    if len(data) != KEY_BYTES:
        raise UserError(f"key file {path} holds {len(data)} bytes; a {what} file holds exactly {KEY_BYTES} raw bytes")
    return data


def generate_key_file(path: Path | str) -> None:
    """32 random bytes, mode 0600, never overwriting an existing file."""
    path = Path(path)
    if path.exists():
        raise UserError(
            f"{path} exists; refusing to overwrite a key file (checkpoints encrypted with it would be lost)"
        )
    atomic_write_bytes(path, os.urandom(KEY_BYTES))
    os.chmod(path, 0o600)


def load_key_file(path: Path | str) -> bytes:
    return read_key_bytes(path, "checkpoint key")


def ensure_key_file(path: Path | str, purpose: str) -> bytes:
    """The key in ``path``, made first when there is none yet (0600, and its folder 0700 when made here); the
    making is logged with ``purpose`` so that whoever runs the job learns that a key now guards something and
    where it is."""
    path = Path(path)
    if not path.exists():
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            os.chmod(path.parent, 0o700)
        generate_key_file(path)
        log.info("created key file %s (mode 0600) to seal %s; keep it with the run, never share it", path, purpose)
    return load_key_file(path)


# --- sealing -----------------------------------------------------------------------------------------------------

def is_encrypted(blob: bytes) -> bool:
    return blob[:len(MAGIC)] == MAGIC


def _header(binding: Binding) -> bytes:
    run, role = binding.run_id.encode(), binding.role.encode()  # type: ignore[union-attr]
    return _HEAD + _LEN.pack(len(run)) + run + _STEP.pack(binding.step) + _LEN.pack(len(role)) + role


def encrypt_at_rest(data: bytes, key: bytes, binding: Binding) -> bytes:
    """``data`` sealed under ``key`` for the place ``binding`` names (every field given)."""
    if binding.run_id is None or binding.step is None or binding.step < 0:
        raise ValueError(f"a sealed file needs its run id and a step >= 0, got {binding!r}")
    head = _header(binding)
    nonce = os.urandom(_NONCE_BYTES)
    return head + nonce + AESGCM(key).encrypt(nonce, data, head)


def _split(blob: bytes) -> tuple[Binding, bytes, bytes, bytes]:
    """(binding, header, nonce, ciphertext) of a sealed file; nothing is authenticated here."""
    if blob[:len(MAGIC)] != MAGIC:
        raise IntegrityError("malformed", "file is not a MedSynGAN encrypted file")
    version = blob[len(MAGIC)] if len(blob) > len(MAGIC) else None
    if version != FORMAT_VERSION:
        raise IntegrityError("malformed", f"encrypted file has format version {version}, this MedSynGAN reads "
                                          f"version {FORMAT_VERSION} (bound to its run and step) only")
    try:
        at = len(_HEAD)
        (n,) = _LEN.unpack_from(blob, at)
        run = blob[at + 2:at + 2 + n].decode()
        at += 2 + n
        (step,) = _STEP.unpack_from(blob, at)
        at += _STEP.size
        (n,) = _LEN.unpack_from(blob, at)
        role = blob[at + 2:at + 2 + n].decode()
        at += 2 + n
    except (struct.error, UnicodeDecodeError):
        raise IntegrityError("malformed", "encrypted file has a truncated or garbled header") from None
    if len(blob) < at + _NONCE_BYTES + 16:
        raise IntegrityError("malformed", "encrypted file is truncated")
    return Binding(run, step, role), blob[:at], blob[at:at + _NONCE_BYTES], blob[at + _NONCE_BYTES:]


def sealed_binding(blob: bytes) -> Binding:
    """The binding a sealed file declares in its header: authenticated only once :func:`decrypt_at_rest` with
    that binding succeeds."""
    return _split(blob)[0]


def decrypt_at_rest(blob: bytes, key: bytes, expect: Binding) -> bytes:
    """The plaintext, or :class:`IntegrityError`: "malformed" (not a sealed file of this version), "wrong-role",
    "wrong-run", "wrong-step" (a file sealed for another place; the message names both), "wrong-key" (another
    key, or an altered file)."""
    found, head, nonce, ciphertext = _split(blob)
    for reason, want, got in (("wrong-role", expect.role, found.role), ("wrong-run", expect.run_id, found.run_id),
                              ("wrong-step", expect.step, found.step)):
        if want is not None and want != got:
            raise IntegrityError(reason, f"encrypted file is the {found}, not the {expect}")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, head)
    except InvalidTag:
        raise IntegrityError(
            "wrong-key", f"encrypted {found.role} does not open: wrong key file, or the file was altered"
        ) from None
