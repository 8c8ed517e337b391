"""`medsyngan pki`: the operator's certificate chain, SAN, keys and file modes, no overwrite; each hospital's own key
pair in the format Flower 1.42 accepts, and the manifest that ties its public half to its id."""

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
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from medsyngan.errors import UserError
from medsyngan.federated.app_signing import load_federation_public
from medsyngan.federated.hospital_keys import HospitalKeys, add_hospital, hospital_init
from medsyngan.federated.pki import key_fingerprint
from medsyngan.federated.pki import init_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_pki(tmp_path_factory.mktemp("pki") / "federation", "superlink.hospital-net.example")


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
    pki = init_pki(tmp_path / "p", "10.1.2.3")
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


def test_hospital_keys_are_what_flower_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    hospital = hospital_init(tmp_path / "h", 2)
    private = serialization.load_ssh_private_key(hospital.auth_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert hospital.auth_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert stat.S_IMODE(hospital.auth_key.stat().st_mode) == 0o600
    public = serialization.load_ssh_public_key(hospital.auth_pub.read_bytes())
    assert public.public_numbers() == private.public_key().public_numbers()
    # Flower's own loader (used by `flwr supernode register`) accepts it and yields the same key.
    flwr_bytes = try_load_public_key(hospital.auth_pub)
    assert serialization.load_pem_public_key(flwr_bytes).public_numbers() == public.public_numbers()
    assert hospital.hospital_id() == 2 and hospital.info()["public_key_fingerprint"] == key_fingerprint(public)
    with pytest.raises(UserError, match="already exists"):
        hospital_init(tmp_path / "h", 2)


def test_pki_init_makes_no_hospital_private_key(pki):
    """Attack: whoever holds the aggregator's machine impersonates a hospital with a hospital private key found
    there. The operator's PKI holds only the operator's own private keys; hospitals make theirs at home."""
    manifest = json.loads((pki.root / "manifest.json").read_text())
    assert manifest["hospitals"] == []
    assert sorted(manifest["private_files"]) == sorted(["ca.key", "superlink.key", "aggregator_x25519.key",
                                                         "federation_app.key"])
    holding_private = sorted(str(f.relative_to(pki.root)) for f in pki.root.rglob("*")
                             if f.is_file() and (b"PRIVATE KEY" in f.read_bytes() or f.name.endswith(".key")))
    assert holding_private == sorted(manifest["private_files"])


def test_a_hospital_key_reaches_the_manifest_only_as_its_public_half(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospitals = [hospital_init(tmp_path / f"site-{k}", k) for k in range(2)]
    for k, hospital in enumerate(hospitals):
        assert add_hospital(pki, k, hospital.auth_pub) == hospital.info()["public_key_fingerprint"]
    assert pki.hospitals() == [0, 1]
    assert stat.S_IMODE(pki.manifest.stat().st_mode) == 0o644
    assert not any(b"PRIVATE KEY" in f.read_bytes() for f in (pki.root / "hospitals").iterdir())
    keys = HospitalKeys.from_manifest(pki.manifest)
    for k, hospital in enumerate(hospitals):
        # What Flower's SuperLink reports for a node (NodeInfo.public_key): the registered key as PEM.
        pem = serialization.load_ssh_public_key(hospital.auth_pub.read_bytes()).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert keys.hospital_of(pem) == k
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keys.hospital_of(stranger) is None and keys.hospital_of(b"not a key") is None


def test_the_manifest_carries_the_roster_the_hospitals_check_key_adverts_against(tmp_path):
    from flwr.common.config import parse_config_args

    from medsyngan.federated import advert_signing
    from medsyngan.federated.client import node_identity
    from medsyngan.federated.hospital_keys import signed_roster
    from medsyngan.federated.hospital_node import HospitalNode
    from medsyngan.federated.protocol import Job
    from medsyngan.privacy.secagg import SecAggClient, SecAggConfig
    from medsyngan.workflows.federation import server_setup

    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    with pytest.raises(UserError, match="no signed roster"):
        signed_roster(pki.manifest)
    hospitals = [hospital_init(tmp_path / f"site-{k}", k) for k in range(2)]
    for k, hospital in enumerate(hospitals):
        add_hospital(pki, k, hospital.auth_pub)
        for trusted in pki.trust_dir.iterdir():
            (hospital.root / trusted.name).write_bytes(trusted.read_bytes())
    roster = signed_roster(pki.manifest)
    roster.verify(load_federation_public(hospitals[1].federation_pub))  # with the key the hospital pins
    assert roster.hospitals == {k: h.info()["public_key_fingerprint"] for k, h in enumerate(hospitals)}
    setup = server_setup({"mode": "deployment", "manifest": str(pki.manifest), "run-dir": str(tmp_path / "run"),
                          "config": "federated-dcgan64", "overrides": ""})
    assert setup.job.roster == roster.to_bytes()  # every instruction carries it

    # `medsyngan hospital start` hands its ClientApp the hospital's SuperNode key and the federation key.
    command = HospitalNode(hospitals[1], "127.0.0.1:1", tmp_path, tmp_path / "home").supernode_command(tmp_path / "s")
    identity = node_identity(parse_config_args([command[command.index("--node-config") + 1]]), Job("", "run-1"))
    assert identity.federation_public == hospitals[1].federation_pub.resolve()
    advert = SecAggClient(2, SecAggConfig(ids=(1, 2), threshold=2, ring_bits=24, length=4)).advertise()
    signature = advert_signing.sign_advert(advert_signing.load_hospital_key(identity.signing_key), "run-1", 3, 1,
                                           advert)
    assert advert_signing.advert_refusal(roster, "run-1", 3, 1, advert, signature) is None
    assert "binds to hospital 1" in advert_signing.advert_refusal(roster, "run-1", 3, 0, advert, signature)


def test_add_hospital_refuses_a_second_key_a_reused_key_and_a_wrong_kind(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    first = hospital_init(tmp_path / "a", 0)
    add_hospital(pki, 0, first.auth_pub)
    with pytest.raises(UserError, match="hospital 0 is already in"):
        add_hospital(pki, 0, hospital_init(tmp_path / "b", 0).auth_pub)
    with pytest.raises(UserError, match="already registered as hospital 0"):
        add_hospital(pki, 1, first.auth_pub)
    ed = tmp_path / "ed.pub"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(UserError, match="not an ECDSA key on a NIST curve"):
        add_hospital(pki, 1, ed)
    with pytest.raises(UserError, match="not found"):
        add_hospital(pki, 1, tmp_path / "missing.pub")
    assert pki.hospitals() == [0]


def test_operator_keys_and_what_hospitals_pin(pki):
    private = pki.aggregator_key.read_bytes()
    public = pki.aggregator_pub.read_bytes()
    assert len(private) == 32 and len(public) == 32
    derived = x25519.X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
    assert derived == public
    signing = serialization.load_pem_private_key(pki.federation_key.read_bytes(), None)
    pinned = load_federation_public(pki.trust_dir / "federation_app.pub")
    assert pinned.public_bytes_raw() == signing.public_key().public_bytes_raw()
    assert sorted(p.name for p in pki.trust_dir.iterdir()) == ["aggregator_x25519.pub", "ca.crt", "federation_app.pub"]
    assert (pki.trust_dir / "aggregator_x25519.pub").read_bytes() == public
    assert (pki.trust_dir / "ca.crt").read_bytes() == pki.ca_cert.read_bytes()


def test_private_files_are_0600_and_listed(pki):
    manifest = json.loads((pki.root / "manifest.json").read_text())
    for rel in manifest["private_files"]:
        assert stat.S_IMODE((pki.root / rel).stat().st_mode) == 0o600, rel
    for rel in ("ca.crt", "superlink.crt", "aggregator_x25519.pub", "federation_app.pub", "manifest.json"):
        assert stat.S_IMODE((pki.root / rel).stat().st_mode) & 0o077 != 0o077  # public files stay readable
    assert stat.S_IMODE(pki.root.stat().st_mode) == 0o700
    ca_der = _cert(pki.ca_cert).public_bytes(serialization.Encoding.DER)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(ca_der)
    assert manifest["ca"]["fingerprint"] == "sha256:" + digest.finalize().hex()


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "pki"
    first = init_pki(out, "127.0.0.1")
    add_hospital(first, 0, hospital_init(tmp_path / "h", 0).auth_pub)
    ca_before = first.ca_cert.read_bytes()
    with pytest.raises(UserError, match="--force"):
        init_pki(out, "127.0.0.1")
    assert first.ca_cert.read_bytes() == ca_before
    second = init_pki(out, "127.0.0.1", force=True)
    assert second.ca_cert.read_bytes() != ca_before and second.hospitals() == []


def test_force_never_deletes_a_folder_that_is_not_a_pki(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="refusing to delete"):
        init_pki(tmp_path, "127.0.0.1", force=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("host", ["bad host", "-x.example", "a..b", ""])
def test_bad_host_is_rejected(tmp_path, host):
    with pytest.raises(UserError, match="--host"):
        init_pki(tmp_path / "p", host)
    assert not (tmp_path / "p").exists()


def test_cli_one_line_error_and_success(tmp_path):
    def medsyngan(*args):
        return subprocess.run([sys.executable, "-m", "medsyngan.cli", *map(str, args)], capture_output=True, text=True)

    init = ("pki", "init", "--out", tmp_path / "p", "--host", "localhost")
    ok = medsyngan(*init)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "p" / "trust" / "federation_app.pub").is_file()
    again = medsyngan(*init)
    assert again.returncode == 2
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert "--force" in again.stderr
    made = medsyngan("pki", "hospital-init", "--out", tmp_path / "site", "--id", 1)
    assert made.returncode == 0, made.stderr
    added = medsyngan("pki", "add-hospital", "--pki", tmp_path / "p", "--id", 1, "--public-key", tmp_path / "site" / "auth.pub")
    assert added.returncode == 0, added.stderr
    fingerprint = json.loads((tmp_path / "site" / "hospital.json").read_text())["public_key_fingerprint"]
    assert fingerprint in made.stdout and fingerprint in added.stdout
    twice = medsyngan("pki", "add-hospital", "--pki", tmp_path / "p", "--id", 1, "--public-key", tmp_path / "site" / "auth.pub")
    assert twice.returncode == 2 and len(twice.stderr.strip().splitlines()) == 1
