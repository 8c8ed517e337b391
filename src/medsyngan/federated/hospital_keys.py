"""A hospital's own identity: its SuperNode key pair, made on its own machine (`medsyngan pki hospital-init`), and
the operator's record of which public key is which hospital (`medsyngan pki add-hospital`, the PKI manifest).

    DIR/                                  the hospital's folder
      auth.key, auth.pub                  its SuperNode key pair (ECDSA P-384, OpenSSH format); only auth.pub leaves
      hospital.json                       its id and its key's fingerprint, to compare with the operator's by phone
      ca.crt, aggregator_x25519.pub,      copied from the operator's trust/ folder: the CA, the aggregator's key it
      federation_app.pub                  encrypts to, the key that must have signed every app it runs

Flower 1.42 reads the SuperNode key with `load_ssh_private_key` and `flwr supernode register` reads the public
key with `load_ssh_public_key`, accepting only NIST curves: hence P-384 in OpenSSH encoding. The aggregator learns
which hospital a SuperNode is from the key Flower authenticated it with (:class:`HospitalKeys`), never from the
node's own word.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from medsyngan.errors import UserError
from medsyngan.federated.pki import (AGGREGATOR_PUB, CA_CERT, FEDERATION_PUB, Pki, build_atomically, fingerprint,
                                     key_fingerprint, load_openssh_public_key, read_manifest, write_private,
                                     write_public)

if TYPE_CHECKING:
    from medsyngan.federated.advert_signing import SignedRoster

HOSPITAL_KEY = "auth.key"
HOSPITAL_PUB = "auth.pub"
HOSPITAL_INFO = "hospital.json"
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
SIGNED_ROSTER = "signed_roster"  # in the manifest: {hospital id → key fingerprint}, signed with the federation key


@dataclass(frozen=True)
class HospitalDir:
    """A hospital's own folder: its key pair from `hospital_init` and the trusted files the operator shipped."""

    root: Path

    @property
    def auth_key(self) -> Path:
        return self.root / HOSPITAL_KEY

    @property
    def auth_pub(self) -> Path:
        return self.root / HOSPITAL_PUB

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def aggregator_pub(self) -> Path:
        return self.root / AGGREGATOR_PUB

    @property
    def federation_pub(self) -> Path:
        return self.root / FEDERATION_PUB

    def info(self) -> dict:
        """hospital.json: the hospital's id and its key's fingerprint."""
        path = self.root / HOSPITAL_INFO
        try:
            info = json.loads(path.read_text())
            if not isinstance(info.get("id"), int) or not isinstance(info.get("public_key_fingerprint"), str):
                raise ValueError("it names no id or fingerprint")
            return info
        except FileNotFoundError:
            raise UserError(f"{path} not found; create the hospital's keys with `medsyngan pki hospital-init`") from None
        except (ValueError, AttributeError) as exc:
            raise UserError(f"{path} is damaged ({exc}); create the hospital's keys again with "
                            "`medsyngan pki hospital-init`") from None

    def hospital_id(self) -> int:
        return int(self.info()["id"])


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode public key in OpenSSH form, as `flwr supernode register` accepts it (an EC key on a NIST
    curve); a one-line error otherwise."""
    hint = "use the auth.pub that the hospital made with `medsyngan pki hospital-init`"
    key = load_openssh_public_key(path, "public key", hint)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise UserError(f"{path} is not an ECDSA key on a NIST curve, which Flower requires; {hint}")
    return key


def hospital_init(out: Path, hospital_id: int) -> HospitalDir:
    """A hospital's SuperNode key pair, made on its own machine; `auth.pub` is what it sends to the operator."""
    out = Path(out)
    if hospital_id < 0:
        raise UserError(f"--id {hospital_id}: hospital ids start at 0")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose another --out (a hospital's key "
                        "is made once: the operator registered its public half)")

    def populate(root: Path) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write_private(root / HOSPITAL_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        write_public(root / HOSPITAL_PUB, pub + f" medsyngan-hospital-{hospital_id}\n".encode())
        info = {"id": hospital_id, "public_key_fingerprint": key_fingerprint(key.public_key())}
        write_public(root / HOSPITAL_INFO, (json.dumps(info, indent=2) + "\n").encode())

    build_atomically(out, populate)
    return HospitalDir(out)


def _registered(manifest_path: Path) -> dict[str, int]:
    """Fingerprint → hospital id of every key the manifest lists, computed from the key files themselves."""
    rows = read_manifest(manifest_path)["hospitals"]
    try:
        return {key_fingerprint(load_node_public_key(manifest_path.parent / str(row["public_key"]))): int(row["id"])
                for row in rows}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"PKI manifest {manifest_path} has a damaged hospital entry ({exc}); restore it") from None


def add_hospital(pki: Pki, hospital_id: int, public_key: Path) -> str:
    """Register hospital `hospital_id`'s SuperNode public key in the manifest; returns its fingerprint, which the
    operator compares with the one the hospital reads from its hospital.json. An id or a key already present is
    refused: one key per hospital, one hospital per key. The manifest's roster of hospital keys is signed anew with
    the federation key, for the hospitals to check each other's secure-aggregation key adverts against."""
    from medsyngan.federated.advert_signing import SignedRoster
    from medsyngan.federated.app_signing import load_signing_key
    from medsyngan.rundir import atomic_write_text

    if hospital_id < 0:
        raise UserError(f"--id {hospital_id}: hospital ids start at 0")
    manifest = read_manifest(pki.manifest)
    key = load_node_public_key(public_key)
    digest = key_fingerprint(key)
    registered = _registered(pki.manifest)
    if hospital_id in registered.values():
        raise UserError(f"hospital {hospital_id} is already in {pki.manifest}; a hospital has one key")
    if digest in registered:
        raise UserError(f"{public_key} is already registered as hospital {registered[digest]}; each hospital makes "
                        "its own key with `medsyngan pki hospital-init`")
    target = pki.hospital_pub(hospital_id)
    target.parent.mkdir(mode=0o755, exist_ok=True)
    target.unlink(missing_ok=True)  # left by an add that failed before the manifest was written
    write_public(target, key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                 + f" medsyngan-hospital-{hospital_id}\n".encode())
    manifest["hospitals"] = sorted(manifest["hospitals"] + [{
        "id": hospital_id, "public_key": str(target.relative_to(pki.root)), "public_key_fingerprint": digest,
    }], key=lambda row: int(row["id"]))
    roster = {**{h: fp for fp, h in registered.items()}, hospital_id: digest}
    manifest[SIGNED_ROSTER] = SignedRoster.sign(load_signing_key(pki.federation_key), roster).to_json()
    atomic_write_text(pki.manifest, json.dumps(manifest, indent=2) + "\n")
    os.chmod(pki.manifest, 0o644)  # a public file, like the manifest `pki init` wrote
    return digest


def signed_roster(manifest_path: Path):
    """The manifest's roster of hospital keys as the federation key signed it (an advert_signing.SignedRoster)."""
    from medsyngan.federated.advert_signing import load_roster

    manifest = read_manifest(manifest_path)
    if SIGNED_ROSTER not in manifest:
        raise UserError(f"PKI manifest {manifest_path} holds no signed roster of hospital keys, which secure "
                        "aggregation needs; add the hospitals with `medsyngan pki add-hospital`")
    return load_roster(manifest[SIGNED_ROSTER], str(manifest_path))


@dataclass(frozen=True)
class HospitalKeys:
    """Which SuperNode key is which hospital, from the operator's manifest: the aggregator's only source for a
    node's hospital id (a node's own claim is checked against it, never believed)."""

    by_fingerprint: Mapping[str, int]

    @classmethod
    def from_manifest(cls, path: Path | str) -> "HospitalKeys":
        registered = _registered(Path(path))
        if not registered:
            raise UserError(f"{path} lists no hospitals; add each with `medsyngan pki add-hospital`")
        return cls(registered)

    def hospital_of(self, node_public_key: bytes) -> int | None:
        """The hospital whose registered key Flower authenticated a node with (its NodeInfo.public_key, PEM);
        None for a key not in the manifest or not a key at all."""
        try:
            key = serialization.load_pem_public_key(node_public_key)
        except (ValueError, UnsupportedAlgorithm):
            return None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return None
        return self.by_fingerprint.get(key_fingerprint(key))


def simulation_keys(folder: Path, hospitals: int) -> SignedRoster:
    """A simulation's keys, made on first use in ``folder`` (the run's): a federation key and each virtual
    hospital's SuperNode key as `pki hospital-init` makes them (``hospital-K/auth.key``); returns the signed
    roster. Virtual hospitals share the run's machine, so they read their key and the federation key from here."""
    from medsyngan.federated.advert_signing import SignedRoster
    from medsyngan.federated.app_signing import load_signing_key
    from medsyngan.federated.pki import FEDERATION_KEY

    folder.mkdir(parents=True, exist_ok=True)
    federation_key, federation_pub = folder / FEDERATION_KEY, folder / FEDERATION_PUB
    if not federation_key.is_file():
        write_private(federation_key, ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signing = load_signing_key(federation_key)
    if not federation_pub.is_file():
        write_public(federation_pub, signing.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" medsyngan-simulation\n")
    roster = {}
    for hospital in range(hospitals):
        own = HospitalDir(folder / f"hospital-{hospital}")
        if not own.auth_key.is_file():
            hospital_init(own.root, hospital)
        roster[hospital] = own.info()["public_key_fingerprint"]
    return SignedRoster.sign(signing, roster)
