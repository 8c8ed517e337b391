"""Files sealed at rest (medsyngan.sealed): each opens only under its key, for the run, step and role it was
sealed for; every other file is refused with a reason that says where it belongs."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from medsyngan.errors import UserError
from medsyngan.sealed import (
    MAGIC,
    Binding,
    IntegrityError,
    decrypt_at_rest,
    encrypt_at_rest,
    ensure_key_file,
    generate_key_file,
    load_key_file,
    sealed_binding,
)

PAYLOAD = os.urandom(4096)
HERE = Binding("run-a", 500, "checkpoint/meta.json")


def _flip(blob: bytes, offset: int) -> bytes:
    data = bytearray(blob)
    data[offset] ^= 0x01
    return bytes(data)


def test_round_trip_under_the_key_and_refusal_of_another_key_or_an_altered_byte(tmp_path):
    generate_key_file(tmp_path / "ckpt.key")
    assert stat.S_IMODE((tmp_path / "ckpt.key").stat().st_mode) == 0o600
    key = load_key_file(tmp_path / "ckpt.key")
    sealed = encrypt_at_rest(PAYLOAD, key, HERE)
    assert sealed.startswith(MAGIC) and PAYLOAD[:64] not in sealed
    assert decrypt_at_rest(sealed, key, HERE) == PAYLOAD
    with pytest.raises(IntegrityError) as info:
        decrypt_at_rest(sealed, os.urandom(32), HERE)
    assert info.value.reason == "wrong-key"
    with pytest.raises(IntegrityError) as info:
        decrypt_at_rest(_flip(sealed, len(sealed) // 2), key, HERE)
    assert info.value.reason == "wrong-key"
    with pytest.raises(UserError, match="refusing to overwrite"):
        generate_key_file(tmp_path / "ckpt.key")


@pytest.mark.parametrize("elsewhere, reason", [
    (Binding("run-b", 500, "checkpoint/meta.json"), "wrong-run"),
    (Binding("run-a", 400, "checkpoint/meta.json"), "wrong-step"),
    (Binding("run-a", 500, "checkpoint/train_state.pt"), "wrong-role"),
])
def test_a_file_sealed_for_another_run_step_or_role_is_refused_under_the_same_key(elsewhere, reason):
    """Attack: a file swapped in from another run, another step or another role of the same key."""
    key = os.urandom(32)
    with pytest.raises(IntegrityError) as info:
        decrypt_at_rest(encrypt_at_rest(PAYLOAD, key, elsewhere), key, HERE)
    assert info.value.reason == reason
    assert str(elsewhere) in str(info.value) and str(HERE) in str(info.value)


def test_an_edited_binding_in_the_header_does_not_open():
    """Attack: the clear header of a file from step 400 edited to claim step 500; the binding is authenticated."""
    key = os.urandom(32)
    old = encrypt_at_rest(PAYLOAD, key, Binding("run-a", 400, "checkpoint/meta.json"))
    step_at = old.index(b"run-a") + len(b"run-a")
    forged = old[:step_at] + (500).to_bytes(8, "little") + old[step_at + 8:]
    assert sealed_binding(forged) == HERE
    with pytest.raises(IntegrityError) as info:
        decrypt_at_rest(forged, key, HERE)
    assert info.value.reason == "wrong-key"


def test_the_reader_checks_only_what_it_knows():
    """A lone file copied out of its run: the reader knows its role only, and learns the rest from the header."""
    key = os.urandom(32)
    sealed = encrypt_at_rest(PAYLOAD, key, HERE)
    assert decrypt_at_rest(sealed, key, Binding(None, None, HERE.role)) == PAYLOAD
    assert sealed_binding(sealed) == HERE


@pytest.mark.parametrize("blob, message", [
    (b"not sealed at all", "not a MedSynGAN encrypted file"),
    (MAGIC + bytes([1]) + bytes(range(60)), "format version 1"),
    (MAGIC + bytes([2, 200, 0]) + b"short", "truncated or garbled header"),
], ids=["not sealed", "format version 1", "garbled header"])
def test_unreadable_files_are_malformed(blob, message):
    with pytest.raises(IntegrityError, match=message) as info:
        decrypt_at_rest(blob, os.urandom(32), HERE)
    assert info.value.reason == "malformed"


def test_sealing_needs_the_whole_binding():
    with pytest.raises(ValueError):
        encrypt_at_rest(PAYLOAD, os.urandom(32), Binding(None, 1, "checkpoint/meta.json"))


def test_ensure_key_file_makes_a_private_key_once_and_says_so(tmp_path, caplog):
    path = tmp_path / "run" / "keys" / "checkpoint.key"
    with caplog.at_level(logging.INFO, logger="medsyngan"):
        key = ensure_key_file(path, "the run's secrets")
    assert f"created key file {path}" in caplog.text and "the run's secrets" in caplog.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    caplog.clear()
    assert ensure_key_file(path, "the run's secrets") == key == path.read_bytes()
    assert "created" not in caplog.text
