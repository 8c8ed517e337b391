"""Files encrypted at rest: AES-256-GCM under a 32-byte key file.

Format of a sealed file::

    "MSGC" | version (1 byte) | nonce (12 random bytes) | AES-256-GCM(data)    AD = "MSGC" | version | context

``context`` names what the file is (e.g. "checkpoint/model.safetensors"): a file sealed as one thing does not open
as another, so an attacker with write access cannot swap the optimizer state into the place of the weights.
Nonces are random: one long-lived key seals few files (one set per checkpoint), and the chance of a repeated nonce
stays below 2^-32 up to 2^32 files.

This module sits beside ``rundir.py``, below training, so that checkpoints can be sealed without training
importing the privacy layer; ``medsyngan.privacy.crypto`` builds the encryption of updates in transit on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medsyngan.errors import UserError
from medsyngan.rundir import atomic_write_bytes

KEY_BYTES = 32
FORMAT_VERSION = 1
MAGIC = b"MSGC"
_HEAD = MAGIC + bytes([FORMAT_VERSION])
_NONCE_BYTES = 12


class IntegrityError(Exception):
    """A message or file failed authentication or does not belong where it arrived; it was not used.

    ``reason`` is one of: tampered, replay, wrong-hospital, wrong-round, wrong-model, unknown-round-key,
    malformed, wrong-key. A message from another run fails as "tampered": the run id is bound only into the
    key and the associated data.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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


# --- sealing -----------------------------------------------------------------------------------------------------

def is_encrypted(blob: bytes) -> bool:
    return blob[:len(MAGIC)] == MAGIC


def encrypt_at_rest(data: bytes, key: bytes, context: str) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return _HEAD + nonce + AESGCM(key).encrypt(nonce, data, _HEAD + context.encode())


def decrypt_at_rest(blob: bytes, key: bytes, context: str) -> bytes:
    """The plaintext, or :class:`IntegrityError` ("malformed": not a sealed file of this version; "wrong-key":
    another key, an altered file, or a file sealed as something other than ``context``)."""
    if blob[:len(_HEAD)] != _HEAD:
        raise IntegrityError("malformed", "file is not a MedSynGAN encrypted file (or another version)")
    nonce_end = len(_HEAD) + _NONCE_BYTES
    try:
        return AESGCM(key).decrypt(blob[len(_HEAD):nonce_end], blob[nonce_end:], _HEAD + context.encode())
    except InvalidTag:
        raise IntegrityError(
            "wrong-key", f"encrypted {context} does not open: wrong key file, or the file was altered"
        ) from None
