"""Signed secure-aggregation key adverts: the signature step of Bonawitz et al. (2017) against an aggregator that
substitutes its own keys for a hospital's peers.

Two signatures, two keys the hospitals already have:

    roster   = the federation's list {hospital id → fingerprint of its SuperNode key}, signed with the federation key
               (Ed25519, `federation_app.key`), which every hospital pins (`federation_app.pub`)
    advert   = (run id, round, hospital id, its two X25519 public keys), signed by the hospital with its SuperNode key
               (ECDSA P-384, `auth.key`), sent with that key's public half

A hospital shares its secrets in a round only when every advert it received is signed, by the key the roster binds
to the advertised hospital id, for this run and this round (:func:`check_adverts`); otherwise it refuses the round
in one line, before anything of its secrets leaves it. The aggregator (or a relay) holds neither the federation
key nor any hospital's key, so it can neither make a roster with its own key in it nor sign keys in a hospital's
name; replaying a hospital's advert from another round gives it nothing, since it lacks that advert's private keys.

The roster comes with every instruction (:class:`~medsyngan.federated.protocol.Job`): in a deployment
`medsyngan pki add-hospital` signs it into the PKI manifest, in a simulation the run makes every key itself
(:func:`~medsyngan.federated.hospital_keys.simulation_keys`), as it does the aggregator's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medsyngan.errors import UserError
from medsyngan.federated.pki import key_fingerprint
from medsyngan.federated.policy import PolicyRefusal
from medsyngan.privacy.secagg import KeyAdvert

ROSTER_DOMAIN = b"medsyngan hospital roster, v1"
ADVERT_DOMAIN = b"medsyngan secure-aggregation key advert, v1"


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class SignedRoster:
    """Which SuperNode key is which hospital, as the federation key signed it."""

    hospitals: Mapping[int, str]  # hospital id → key_fingerprint of its SuperNode key
    signature: bytes

    @staticmethod
    def message(hospitals: Mapping[int, str]) -> bytes:
        return ROSTER_DOMAIN + b"\n" + _canonical({str(h): fp for h, fp in sorted(hospitals.items())})

    @classmethod
    def sign(cls, key: ed25519.Ed25519PrivateKey, hospitals: Mapping[int, str]) -> "SignedRoster":
        return cls(dict(hospitals), key.sign(cls.message(hospitals)))

    def to_json(self) -> dict:
        return {"hospitals": {str(h): fp for h, fp in sorted(self.hospitals.items())},
                "signature": base64.b64encode(self.signature).decode()}

    @classmethod
    def from_json(cls, value: object) -> "SignedRoster":
        """A roster as :meth:`to_json` wrote it; ValueError for anything else."""
        if not isinstance(value, dict) or not isinstance(value.get("hospitals"), dict):
            raise ValueError("the roster names no hospitals")
        hospitals = {int(h): str(fp) for h, fp in value["hospitals"].items()}
        return cls(hospitals, base64.b64decode(str(value.get("signature", "")), validate=True))

    def to_bytes(self) -> bytes:
        return _canonical(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes) -> "SignedRoster":
        return cls.from_json(json.loads(data))

    def verify(self, federation: ed25519.Ed25519PublicKey) -> None:
        try:
            federation.verify(self.signature, self.message(self.hospitals))
        except InvalidSignature:
            raise PolicyRefusal("the hospital roster is not signed with the federation key this hospital pins "
                                "(federation_app.pub)") from None


@dataclass(frozen=True)
class AdvertSignature:
    """A hospital's signature of its key advert, and the public key (DER SubjectPublicKeyInfo) it signed with."""

    signer: bytes
    signature: bytes


def advert_message(run_id: str, round_: int, hospital: int, advert: KeyAdvert) -> bytes:
    return ADVERT_DOMAIN + b"\n" + _canonical({"run": run_id, "round": round_, "hospital": hospital,
                                               "cipher": advert.cipher_public.hex(), "mask": advert.mask_public.hex()})


def load_hospital_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """A hospital's SuperNode private key (OpenSSH format, from `medsyngan pki hospital-init`)."""
    from medsyngan.federated.pki import load_private_key

    return load_private_key(path, serialization.load_ssh_private_key, ec.EllipticCurvePrivateKey, "hospital key",
                            "give the hospital's ECDSA auth.key from `medsyngan pki hospital-init`")


def sign_advert(key: ec.EllipticCurvePrivateKey, run_id: str, round_: int, hospital: int,
                advert: KeyAdvert) -> AdvertSignature:
    signer = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return AdvertSignature(signer, key.sign(advert_message(run_id, round_, hospital, advert), ec.ECDSA(hashes.SHA384())))


def advert_refusal(roster: SignedRoster, run_id: str, round_: int, hospital: int, advert: KeyAdvert,
                   signature: AdvertSignature | None) -> str | None:
    """Why hospital ``hospital``'s advert cannot be trusted in this run and round; None when it can."""
    if signature is None or not signature.signer or not signature.signature:
        return f"hospital {hospital}'s key advert is unsigned"
    try:
        public = serialization.load_der_public_key(signature.signer)
    except (ValueError, UnsupportedAlgorithm):
        public = None
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return f"hospital {hospital}'s key advert names no ECDSA signing key"
    owners = [h for h, fp in roster.hospitals.items() if fp == key_fingerprint(public)]
    if owners != [hospital]:
        bound = f"hospital {owners[0]}" if owners else "no hospital"
        return f"hospital {hospital}'s key advert is signed by a key the roster binds to {bound}"
    try:
        public.verify(signature.signature, advert_message(run_id, round_, hospital, advert), ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return (f"hospital {hospital}'s key advert is not signed for run {run_id} round {round_} (signed for "
                "another run or round, or its keys were changed)")
    return None


def check_adverts(roster: SignedRoster, federation: ed25519.Ed25519PublicKey, run_id: str, round_: int,
                  adverts: Mapping[int, KeyAdvert], signatures: Mapping[int, AdvertSignature], who: int) -> None:
    """Hospital ``who``'s check before it shares its secrets: the roster is the federation's, and each advert
    (by hospital id) is signed by that hospital for this run and round. PolicyRefusal with the first reason."""
    roster.verify(federation)
    for hospital in sorted(adverts):
        reason = advert_refusal(roster, run_id, round_, hospital, adverts[hospital], signatures.get(hospital))
        if reason is not None:
            raise PolicyRefusal(f"hospital {who} refuses round {round_}: {reason}; it shares nothing")


# --- where the keys come from ------------------------------------------------------------------------------------

def load_roster(value: object, where: str) -> SignedRoster:
    try:
        return SignedRoster.from_json(value)
    except (ValueError, TypeError) as exc:
        raise UserError(f"the signed hospital roster in {where} is damaged ({exc}); add a hospital with "
                        "`medsyngan pki add-hospital` to sign it again") from None
