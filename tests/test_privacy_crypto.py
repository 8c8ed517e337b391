"""End-to-end encryption: a round trip works, and every tampered, replayed or misrouted message is refused."""

import logging
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medsyngan.errors import UserError
from medsyngan.privacy.crypto import (
    HospitalSession,
    IntegrityError,
    UpdateReceiver,
    load_identity_key,
    load_key_file,
    load_public_key,
    parse_sealed,
    serialized_model_hash,
    write_identity_key,
)

RUN = "run-42"
MODEL = serialized_model_hash(b"global weights of round 3")
PAYLOAD = os.urandom(4096)


@pytest.fixture()
def pair():
    identity = X25519PrivateKey.generate()
    agg = UpdateReceiver(identity, RUN)
    session = HospitalSession(identity.public_key(), RUN, "h1", 3, agg.round_public(3))
    return agg, session


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_round_trip(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    assert PAYLOAD not in sealed
    assert agg.open(sealed, hospital_id="h1", round_=3, global_model_hash=MODEL) == PAYLOAD


def test_nonces_never_repeat_within_a_session(pair):
    agg, session = pair
    nonces = {parse_sealed(session.seal(b"x", MODEL))[0].nonce for _ in range(100)}
    assert len(nonces) == 100


# Sealed header: magic 4 | version 1 | round 8 | model hash 32 | E.pub 32 | R.pub 32 | nonce 12 | id len 2 | id
ROUND, MODEL_HASH, SESSION_KEY, ROUND_KEY, NONCE = slice(5, 13), slice(13, 45), slice(45, 77), slice(77, 109), 109


@pytest.mark.parametrize("where", ["ciphertext", "tag", "nonce", "session_key", "model_hash_header"])
def test_tampering_is_rejected_and_logged(pair, where, caplog):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    index = {"ciphertext": len(sealed) - 100, "tag": len(sealed) - 1, "nonce": NONCE + 11,
             "session_key": SESSION_KEY.start + 5, "model_hash_header": MODEL_HASH.start}[where]
    with caplog.at_level(logging.WARNING, logger="medsyngan.privacy.crypto"):
        with pytest.raises(IntegrityError) as info:
            agg.open(_flip(sealed, index), hospital_id="h1", round_=3, global_model_hash=MODEL)
    # A header edit is caught by the explicit checks (wrong-model) or, failing those, by the tag.
    assert info.value.reason in {"tampered", "wrong-model", "malformed"}
    assert any("rejected" in r.message for r in caplog.records)


def test_associated_data_is_authenticated_even_if_the_header_matches(pair):
    # The receiver builds the AD from what it expects, so lying about the model (in the header AND in the
    # expectation) still fails: the sealed AD held the true hash.
    agg, session = pair
    sealed = bytearray(session.seal(PAYLOAD, MODEL))
    other = serialized_model_hash(b"another model")
    sealed[MODEL_HASH] = other
    with pytest.raises(IntegrityError) as info:
        agg.open(bytes(sealed), hospital_id="h1", round_=3, global_model_hash=other)
    assert info.value.reason == "tampered"


def test_replay_is_rejected(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    agg.open(sealed, hospital_id="h1", round_=3, global_model_hash=MODEL)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h1", round_=3, global_model_hash=MODEL)
    assert info.value.reason == "replay"
    # A second, genuinely new message of the same session is accepted.
    assert agg.open(session.seal(b"more", MODEL), hospital_id="h1", round_=3, global_model_hash=MODEL) == b"more"


def test_misrouted_hospital_is_rejected(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h2", round_=3, global_model_hash=MODEL)
    assert info.value.reason == "wrong-hospital"
    # Rewriting the id in the header does not help: the key and AD were bound to h1.
    relabelled = sealed.replace(b"h1", b"h2")
    with pytest.raises(IntegrityError) as info:
        agg.open(relabelled, hospital_id="h2", round_=3, global_model_hash=MODEL)
    assert info.value.reason == "tampered"


def test_wrong_round_is_rejected(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    agg.round_public(4)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h1", round_=4, global_model_hash=MODEL)
    assert info.value.reason == "wrong-round"
    # Editing the round field to 4 hits the wrong round key, editing both keys fails the tag.
    edited = bytearray(sealed)
    edited[ROUND] = (4).to_bytes(8, "little")
    with pytest.raises(IntegrityError) as info:
        agg.open(bytes(edited), hospital_id="h1", round_=4, global_model_hash=MODEL)
    assert info.value.reason == "unknown-round-key"
    edited[ROUND_KEY] = agg.round_public(4)
    with pytest.raises(IntegrityError) as info:
        agg.open(bytes(edited), hospital_id="h1", round_=4, global_model_hash=MODEL)
    assert info.value.reason == "tampered"


def test_wrong_model_hash_is_rejected(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h1", round_=3, global_model_hash=serialized_model_hash(b"round 2 weights"))
    assert info.value.reason == "wrong-model"


def test_closed_round_and_other_run_are_rejected(pair):
    agg, session = pair
    sealed = session.seal(PAYLOAD, MODEL)
    agg.close_round(3)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h1", round_=3, global_model_hash=MODEL)
    assert info.value.reason == "unknown-round-key"

    identity = X25519PrivateKey.generate()
    other_run = UpdateReceiver(identity, "run-43")
    sealed = HospitalSession(identity.public_key(), RUN, "h1", 1, other_run.round_public(1)).seal(b"x", MODEL)
    with pytest.raises(IntegrityError) as info:
        other_run.open(sealed, hospital_id="h1", round_=1, global_model_hash=MODEL)
    assert info.value.reason == "tampered"


def test_a_relay_substituting_the_round_key_cannot_read_or_forge():
    # The relay swaps the aggregator's round key for its own: the hospital's key then still depends on the
    # pinned identity key, which the relay lacks, so the relay cannot decrypt and the aggregator refuses.
    identity = X25519PrivateKey.generate()
    agg = UpdateReceiver(identity, RUN)
    agg.round_public(1)
    relay_key = X25519PrivateKey.generate()
    relay_public = relay_key.public_key().public_bytes_raw()
    sealed = HospitalSession(identity.public_key(), RUN, "h1", 1, relay_public).seal(PAYLOAD, MODEL)
    relay_view = UpdateReceiver(relay_key, RUN)
    relay_view._round_keys[1] = relay_key  # the relay holds the round key it injected, not the identity key
    with pytest.raises(IntegrityError):
        relay_view.open(sealed, hospital_id="h1", round_=1, global_model_hash=MODEL)
    with pytest.raises(IntegrityError) as info:
        agg.open(sealed, hospital_id="h1", round_=1, global_model_hash=MODEL)
    assert info.value.reason == "unknown-round-key"


def test_identity_key_files(tmp_path):
    public = write_identity_key(tmp_path / "aggregator.key")
    assert stat.S_IMODE((tmp_path / "aggregator.key").stat().st_mode) == 0o600
    (tmp_path / "aggregator.pub").write_bytes(public)
    key = load_identity_key(tmp_path / "aggregator.key")
    assert load_public_key(tmp_path / "aggregator.pub").public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(UserError, match="refusing to overwrite"):
        write_identity_key(tmp_path / "aggregator.key")


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_key_file_of_the_wrong_size_is_a_user_error(tmp_path, size):
    path = tmp_path / "bad.key"
    path.write_bytes(b"k" * size)
    with pytest.raises(UserError, match=f"holds {size} bytes") as info:
        load_key_file(path)
    assert "\n" not in str(info.value)


def test_missing_key_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_key_file(tmp_path / "absent.key")
