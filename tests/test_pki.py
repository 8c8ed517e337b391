"""`medsyngan pki init`: certificate chain, SAN, key formats Flower 1.42 accepts, file modes, no overwrite."""

from __future__ import annotations

import ipaddress
import json
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from medsyngan.errors import UserError
from medsyngan.federated.pki import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_pki(tmp_path_factory.mktemp("pki") / "federation", "superlink.hospital-net.example", hospitals=3)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_chain_verifies_and_ca_may_only_sign(pki):
    ca, server = _cert(pki.ca_cert), _cert(pki.server_cert)
    assert server.issuer == ca.subject and ca.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # raises on a bad signature or issuer mismatch
    ca.verify_directly_issued_by(ca)
    ca_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_usage.key_cert_sign and not ca_usage.digital_signature
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    server_key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()


def test_san_holds_host_and_loopback(pki):
    san = _cert(pki.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.hospital-net.example" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)


def test_ip_host_goes_in_as_ip_address(tmp_path):
    pki = init_pki(tmp_path / "p", "10.1.2.3", hospitals=1)
    san = _cert(pki.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    assert "10.1.2.3" not in san.get_values_for_type(x509.DNSName)


def _tls_handshake(pki, server_hostname: str) -> None:
    """A real TLS handshake in memory: Python's client verifies the chain and the host name against the SAN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not complete")


def test_tls_handshake_verifies_for_host_and_not_for_others(pki):
    _tls_handshake(pki, "superlink.hospital-net.example")
    _tls_handshake(pki, "127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        _tls_handshake(pki, "evil.example")


def test_hospital_keys_are_what_flower_loads(pki):
    from flwr.cli.supernode.register import try_load_public_key

    for k in pki.hospitals():
        private = serialization.load_ssh_private_key(pki.hospital_key(k).read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert pki.hospital_key(k).read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        public = serialization.load_ssh_public_key(pki.hospital_pub(k).read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        # Flower's own loader (used by `flwr supernode register`) accepts it and yields the same key.
        flwr_bytes = try_load_public_key(pki.hospital_pub(k))
        assert serialization.load_pem_public_key(flwr_bytes).public_numbers() == public.public_numbers()
    keys = {pki.hospital_pub(k).read_bytes().split()[1] for k in pki.hospitals()}
    assert len(keys) == 3


def test_aggregator_identity_is_raw_x25519_pair_pinned_at_hospitals(pki):
    private = pki.aggregator_key.read_bytes()
    public = pki.aggregator_pub.read_bytes()
    assert len(private) == 32 and len(public) == 32
    derived = x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert derived == public
    for k in pki.hospitals():
        assert (pki.hospital_dir(k) / "aggregator_x25519.pub").read_bytes() == public
        assert (pki.hospital_dir(k) / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()
        assert not (pki.hospital_dir(k) / "aggregator_x25519.key").exists()


def test_private_files_are_0600_and_listed(pki):
    manifest = json.loads((pki.root / "manifest.json").read_text())
    private = manifest["private_files"]
    assert len(private) == 3 + 3  # CA, SuperLink, aggregator + one per hospital
    for rel in private:
        assert stat.S_IMODE((pki.root / rel).stat().st_mode) == 0o600, rel
    for rel in ("ca.crt", "superlink.crt", "aggregator_x25519.pub", "manifest.json"):
        assert stat.S_IMODE((pki.root / rel).stat().st_mode) & 0o077 != 0o077  # public files stay readable
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700
    assert [h["id"] for h in manifest["hospitals"]] == [0, 1, 2]
    ca_der = _cert(pki.ca_cert).public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(ca_der)
    assert manifest["ca"]["fingerprint"] == "sha256:" + digest.finalize().hex()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "pki"
    first = init_pki(out, "127.0.0.1", hospitals=1)
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(UserError, match="--force"):
        init_pki(out, "127.0.0.1", hospitals=1)
    assert first.ca_cert.read_bytes() == ca_before
    second = init_pki(out, "127.0.0.1", hospitals=2, force=True)
    assert second.ca_cert.read_bytes() != ca_before and second.hospitals() == [0, 1]


def test_force_never_deletes_a_folder_that_is_not_a_pki(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="refusing to delete"):
        init_pki(tmp_path, "127.0.0.1", hospitals=1, force=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("host", ["bad host", "-x.example", "a..b", ""])
def test_bad_host_is_rejected(tmp_path, host):
    with pytest.raises(UserError, match="--host"):
        init_pki(tmp_path / "p", host, hospitals=1)
    assert not (tmp_path / "p").exists()


def test_cli_one_line_error_and_success(tmp_path):
    cmd = [sys.executable, "-m", "medsyngan.cli", "pki", "init", "--out", str(tmp_path / "p"), "--host", "localhost", "--hospitals", "2"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "p" / "hospitals" / "hospital-1" / "auth.key").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert "--force" in again.stderr
