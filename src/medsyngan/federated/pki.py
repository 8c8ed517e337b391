"""The operator's keys and certificates: `medsyngan pki init`, on the aggregator's machine.

    PKI/
      ca.crt, ca.key                      the federation's CA (signs the SuperLink certificate)
      superlink.crt, superlink.key        the SuperLink's TLS certificate (HOST in its SAN)
      aggregator_x25519.key / .pub        the aggregator's X25519 identity (raw 32 bytes), for end-to-end encryption
      federation_app.key / .pub           the federation's Ed25519 key that signs app bundles (`pki sign-app`)
      trust/                              what every hospital pins: ca.crt, aggregator_x25519.pub, federation_app.pub
      hospitals/hospital-K.pub            hospital K's SuperNode public key, added by `pki add-hospital`
      manifest.json                       what was made and which SuperNode key is which hospital, with fingerprints,
                                          and that roster signed with the federation key (`pki add-hospital`)

No hospital's private key is made here: each hospital makes its own (:mod:`~medsyngan.federated.hospital_keys`)
and only its public half reaches the operator. Private keys are created 0600 from the start (never chmod'ed
afterwards, so no other user can ever open them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medsyngan.errors import UserError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
AGGREGATOR_KEY = "aggregator_x25519.key"
AGGREGATOR_PUB = "aggregator_x25519.pub"
FEDERATION_KEY = "federation_app.key"
FEDERATION_PUB = "federation_app.pub"
TRUST_DIR = "trust"
TRUSTED_FILES = (CA_CERT, AGGREGATOR_PUB, FEDERATION_PUB)
HOSPITALS_DIR = "hospitals"
MANIFEST = "manifest.json"

_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_CA_DAYS = 3650
_SERVER_DAYS = 825  # the longest lifetime that TLS clients (browsers, macOS) still accept for a leaf


@dataclass(frozen=True)
class Pki:
    """Paths inside a PKI directory made by `init_pki`."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def aggregator_key(self) -> Path:
        return self.root / AGGREGATOR_KEY

    @property
    def aggregator_pub(self) -> Path:
        return self.root / AGGREGATOR_PUB

    @property
    def federation_key(self) -> Path:
        return self.root / FEDERATION_KEY

    @property
    def trust_dir(self) -> Path:
        return self.root / TRUST_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def hospital_pub(self, hospital: int) -> Path:
        return self.root / HOSPITALS_DIR / f"hospital-{hospital}.pub"

    def hospitals(self) -> list[int]:
        """Hospital ids added to the manifest, in order."""
        return sorted(int(h["id"]) for h in read_manifest(self.manifest)["hospitals"])


def write_private(path: Path, data: bytes) -> None:
    """Create a private file readable only by its owner: O_EXCL so an existing file (or a planted symlink)
    is never written through, and the mode is set at creation so there is no window where others can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san_entries(host: str) -> list[x509.GeneralName]:
    """HOST as an IP address or DNS name. Loopback names are always added: the SuperLink starts its own
    SuperExec, which connects over TLS to 127.0.0.1 on the SuperLink's port and verifies this certificate."""
    names: list[x509.GeneralName] = []
    for name in [host, *sorted(_LOOPBACK_NAMES)]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in names:
            names.append(entry)
    return names


def _validate_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    ok = bool(host) and len(host) <= 253 and all(
        0 < len(label) <= 63 and label[0] != "-" and label[-1] != "-" and all(c.isalnum() or c == "-" for c in label)
        for label in labels
    )
    if not ok:
        raise UserError(f"--host {host!r} is neither an IP address nor a DNS name; give the SuperLink's address")


def fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of a SuperNode key's DER SubjectPublicKeyInfo: how the manifest names it and how Flower's node
    records (PEM of the same structure) are matched to it."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return fingerprint(der)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MedSynGAN federation"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("MedSynGAN federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _make_server_cert(
    host: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False  # type: ignore[arg-type]
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_private(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def init_pki(out: Path, host: str, force: bool = False) -> Pki:
    """Create the operator's PKI under `out` (no hospital keys: each hospital makes its own and the operator adds
    the public half with `add_hospital`); refuses to touch an existing non-empty directory unless `force`."""
    out = Path(out)
    _validate_host(host)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out} already holds files (an existing PKI?); choose another --out or pass --force")
        if (out / MANIFEST).is_file():
            shutil.rmtree(out)
        else:
            raise UserError(f"{out} is not empty and has no {MANIFEST}: refusing to delete it even with --force")
    build_atomically(out, lambda tmp: _populate(tmp, host))
    return Pki(out)


def build_atomically(out: Path, populate: Callable[[Path], None]) -> None:
    """Build in a sibling folder, then rename: an interrupted run never leaves a half-made key folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    os.mkdir(tmp, 0o700)
    try:
        populate(tmp)
        os.replace(tmp, out)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _populate(root: Path, host: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(host, ca_key, ca_cert, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    write_public(root / CA_CERT, ca_pem)
    write_private(root / CA_KEY, _pem_private(ca_key))
    write_public(root / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    write_private(root / SERVER_KEY, _pem_private(server_key))

    agg = x25519.X25519PrivateKey.generate()
    agg_pub = agg.public_key().public_bytes_raw()
    write_private(root / AGGREGATOR_KEY, agg.private_bytes_raw())
    write_public(root / AGGREGATOR_PUB, agg_pub)

    signing = ed25519.Ed25519PrivateKey.generate()
    signing_pub = signing.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(root / FEDERATION_KEY, _pem_private(signing))
    write_public(root / FEDERATION_PUB, signing_pub + b" medsyngan-federation\n")

    os.mkdir(root / TRUST_DIR, 0o755)
    for name in TRUSTED_FILES:
        write_public(root / TRUST_DIR / name, (root / name).read_bytes())
    os.mkdir(root / HOSPITALS_DIR, 0o755)

    manifest = {
        "created": now.isoformat(timespec="seconds"),
        "host": host,
        "ca": {"cert": CA_CERT, "key": CA_KEY, "fingerprint": fingerprint(ca_cert.public_bytes(serialization.Encoding.DER))},
        "superlink": {
            "cert": SERVER_CERT,
            "key": SERVER_KEY,
            "san": [str(getattr(n, "value", n)) for n in _san_entries(host)],
            "not_after": server_cert.not_valid_after_utc.isoformat(timespec="seconds"),
        },
        "aggregator": {"private_key": AGGREGATOR_KEY, "public_key": AGGREGATOR_PUB, "fingerprint": fingerprint(agg_pub)},
        "federation_app_key": {"private_key": FEDERATION_KEY, "public_key": FEDERATION_PUB,
                               "fingerprint": fingerprint(signing.public_key().public_bytes_raw())},
        "trust": [f"{TRUST_DIR}/{name}" for name in TRUSTED_FILES],
        "hospitals": [],
        "private_files": [CA_KEY, SERVER_KEY, AGGREGATOR_KEY, FEDERATION_KEY],
    }
    write_public(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def load_openssh_public_key(path: Path, what: str, hint: str):
    """The public key in an OpenSSH-format file; a one-line error naming ``what`` and ``hint`` (where the right
    file comes from) for a missing or unreadable one."""
    try:
        return serialization.load_ssh_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; {hint}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UserError(f"{path} is not an OpenSSH public key ({exc}); {hint}") from None


def load_private_key(path: Path, load: Callable, kind: type, what: str, hint: str):
    """The private key in ``path``, read with ``load`` (PEM or OpenSSH) and of type ``kind``; a one-line error
    naming ``what`` and ``hint`` (where the right file comes from) for a missing, unreadable or other key."""
    try:
        key = load(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found; {hint}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UserError(f"{path} is not a private key ({exc}); {hint}") from None
    if not isinstance(key, kind):
        raise UserError(f"{path} is not the right kind of key; {hint}")
    return key


def read_manifest(path: Path) -> dict:
    """The manifest's content; a one-line error for a missing or damaged one."""
    try:
        manifest = json.loads(Path(path).read_text())
        if not isinstance(manifest.get("hospitals"), list):
            raise ValueError("no hospitals list")
        return manifest
    except FileNotFoundError:
        raise UserError(f"PKI manifest {path} not found; create the PKI with `medsyngan pki init`") from None
    except (ValueError, AttributeError) as exc:
        raise UserError(f"PKI manifest {path} is damaged ({exc}); restore it or make the PKI again") from None
