"""The federation's keys and certificates: `medsyngan pki init`.

One directory holds everything a deployment needs::

    DIR/
      ca.crt, ca.key                      the federation's CA (signs the SuperLink certificate)
      superlink.crt, superlink.key        the SuperLink's TLS certificate (HOST in its SAN)
      aggregator_x25519.key / .pub        the aggregator's X25519 identity (raw 32 bytes; .pub is pinned
                                          at every hospital for end-to-end update encryption)
      hospitals/hospital-K/
        auth.key, auth.pub                SuperNode authentication key pair (ECDSA P-384, OpenSSH format)
        ca.crt, aggregator_x25519.pub     copies of what the hospital must trust (ship this folder only)
      manifest.json                       what was made, with fingerprints

Flower 1.42 reads the SuperNode key with `load_ssh_private_key` and `flwr supernode register` reads the
public key with `load_ssh_public_key`, accepting only NIST curves: hence P-384 in OpenSSH encoding.
Private keys are created 0600 from the start (never chmod'ed afterwards, so no other user can ever open them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medsyngan.errors import UserError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
AGGREGATOR_KEY = "aggregator_x25519.key"
AGGREGATOR_PUB = "aggregator_x25519.pub"
HOSPITALS_DIR = "hospitals"
HOSPITAL_KEY = "auth.key"
HOSPITAL_PUB = "auth.pub"
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

    def hospital_dir(self, hospital: int) -> Path:
        return self.root / HOSPITALS_DIR / f"hospital-{hospital}"

    def hospital_key(self, hospital: int) -> Path:
        return self.hospital_dir(hospital) / HOSPITAL_KEY

    def hospital_pub(self, hospital: int) -> Path:
        return self.hospital_dir(hospital) / HOSPITAL_PUB

    def hospitals(self) -> list[int]:
        """Hospital ids found in the manifest, in order."""
        manifest = json.loads((self.root / MANIFEST).read_text())
        return [h["id"] for h in manifest["hospitals"]]


def _write_private(path: Path, data: bytes) -> None:
    """Create a private file readable only by its owner: O_EXCL so an existing file (or a planted symlink)
    is never written through, and the mode is set at creation so there is no window where others can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
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


def _fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def init_pki(out: Path, host: str, hospitals: int, force: bool = False) -> Pki:
    """Create a complete PKI under `out`; refuses to touch an existing non-empty directory unless `force`."""
    out = Path(out)
    if hospitals < 1:
        raise UserError(f"--hospitals {hospitals}: a federation needs at least 1 hospital")
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

    # Build everything in a sibling folder, then rename: an interrupted run never leaves a half-made PKI.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    os.mkdir(tmp, 0o700)
    try:
        _populate(tmp, host, hospitals)
        os.replace(tmp, out)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Pki(out)


def _populate(root: Path, host: str, hospitals: int) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, ca_cert = _make_ca(now)
    server_key, server_cert = _make_server_cert(host, ca_key, ca_cert, now)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    _write_public(root / CA_CERT, ca_pem)
    _write_private(root / CA_KEY, _pem_private(ca_key))
    _write_public(root / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(root / SERVER_KEY, _pem_private(server_key))

    agg = x25519.X25519PrivateKey.generate()
    agg_pub = agg.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    _write_private(
        root / AGGREGATOR_KEY,
        agg.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
    )
    _write_public(root / AGGREGATOR_PUB, agg_pub)

    pki = Pki(root)
    hospital_rows = []
    for k in range(hospitals):
        hdir = pki.hospital_dir(k)
        hdir.mkdir(parents=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP384R1())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pub += f" medsyngan-hospital-{k}\n".encode()
        _write_private(
            hdir / HOSPITAL_KEY,
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        )
        _write_public(hdir / HOSPITAL_PUB, pub)
        _write_public(hdir / CA_CERT, ca_pem)
        _write_public(hdir / AGGREGATOR_PUB, agg_pub)
        hospital_rows.append(
            {"id": k, "dir": str(hdir.relative_to(root)), "public_key": str((hdir / HOSPITAL_PUB).relative_to(root)),
             "public_key_fingerprint": _fingerprint(pub.split()[1])}
        )

    manifest = {
        "created": now.isoformat(timespec="seconds"),
        "host": host,
        "ca": {"cert": CA_CERT, "key": CA_KEY, "fingerprint": _fingerprint(ca_cert.public_bytes(serialization.Encoding.DER))},
        "superlink": {
            "cert": SERVER_CERT,
            "key": SERVER_KEY,
            "san": [str(getattr(n, "value", n)) for n in _san_entries(host)],
            "not_after": server_cert.not_valid_after_utc.isoformat(timespec="seconds"),
        },
        "aggregator": {"private_key": AGGREGATOR_KEY, "public_key": AGGREGATOR_PUB, "fingerprint": _fingerprint(agg_pub)},
        "hospitals": hospital_rows,
        "private_files": [CA_KEY, SERVER_KEY, AGGREGATOR_KEY]
        + [str(pki.hospital_key(k).relative_to(root)) for k in range(hospitals)],
    }
    _write_public(root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
