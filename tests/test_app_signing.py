"""The locked-down deployment without processes: signatures of app bundles and run configs, a hospital's ledger of
them, its verifying ClientApp runner and SuperExec executor, its refusal to start without the keys it must pin,
the aggregator's roster from the manifest, and the SuperLink's routes. tests/test_deployment.py runs the same
against real Flower processes."""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from bundles import write_probe_app
from medsyngan.errors import UserError
from medsyngan.federated import app_signing as s
from medsyngan.federated.hospital_keys import HospitalDir, HospitalKeys, add_hospital, hospital_init
from medsyngan.federated.pki import init_pki


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    pki = init_pki(root / "pki", "127.0.0.1")
    app = write_probe_app(root / "app", root / "marker", root / "report.json")
    fab = s.build_fab(app)
    return pki, app, fab


def _config(fab: bytes, **overrides) -> dict:
    return s.fused_run_config(fab, overrides)


def _pinned(pki) -> ed25519.Ed25519PublicKey:
    return s.load_federation_public(pki.trust_dir / "federation_app.pub")


def test_a_signed_bundle_verifies_with_the_pinned_key(federation):
    pki, app, fab = federation
    signature = s.sign_app(pki.federation_key, app, {})
    assert s.build_fab(app) == fab  # Flower's build is deterministic: the bundle `flwr run` sends is the one signed
    config = {**_config(fab), s.SIGNATURE_KEY: signature}
    verified = s.verify(_pinned(pki), fab, config)
    assert verified.digest == hashlib.sha256(signature.encode()).hexdigest()


def test_an_unsigned_bundle_is_refused(federation):
    """Attack: anyone who reaches the SuperLink's Control API submits a bundle of their own with `flwr run`."""
    pki, _, fab = federation
    with pytest.raises(s.BundleRefused, match="carries no app-signature"):
        s.verify(_pinned(pki), fab, _config(fab))
    with pytest.raises(s.BundleRefused, match="malformed"):
        s.verify(_pinned(pki), fab, {**_config(fab), s.SIGNATURE_KEY: "v1:not-a-time:xyz"})


def test_a_bundle_signed_with_another_key_is_refused(federation):
    """Attack: the intruder signs its bundle with a key of its own."""
    pki, _, fab = federation
    config = _config(fab)
    forged = s.sign(ed25519.Ed25519PrivateKey.generate(), fab, config)
    with pytest.raises(s.BundleRefused, match="does not match its signature"):
        s.verify(_pinned(pki), fab, {**config, s.SIGNATURE_KEY: forged})


def test_a_bundle_or_run_config_changed_after_signing_is_refused(federation, tmp_path):
    """Attack: a signed run is replayed with other code, or with other settings (another preset, overrides that
    turn privacy off, another run directory)."""
    pki, app, fab = federation
    config = _config(fab)
    signature = s.sign(s.load_signing_key(pki.federation_key), fab, config)
    changed = write_probe_app(tmp_path / "app", tmp_path / "marker", tmp_path / "report.json")
    (changed / "probe_client.py").write_text((changed / "probe_client.py").read_text() + "\n# one more line\n")
    other_fab = s.build_fab(changed)
    with pytest.raises(s.BundleRefused, match="does not match"):
        s.verify(_pinned(pki), other_fab, {**config, s.SIGNATURE_KEY: signature})
    with pytest.raises(s.BundleRefused, match="does not match"):
        s.verify(_pinned(pki), fab, {**config, "extra": "privacy.dp=false", s.SIGNATURE_KEY: signature})


def test_sign_app_binds_the_run_config_flower_will_fuse(federation):
    pki, app, fab = federation
    medsyngan_app = Path(__file__).resolve().parents[1]
    overrides = {"mode": "deployment", "overrides": "federated.rounds=2"}
    signature = s.sign_app(pki.federation_key, medsyngan_app, overrides)
    repo_fab = s.build_fab(medsyngan_app)
    assert s.verify(_pinned(pki), repo_fab, {**s.fused_run_config(repo_fab, overrides), s.SIGNATURE_KEY: signature})
    with pytest.raises(s.BundleRefused):
        s.verify(_pinned(pki), repo_fab, {**s.fused_run_config(repo_fab, {**overrides, "mode": "simulation"}),
                                          s.SIGNATURE_KEY: signature})
    with pytest.raises(UserError, match="run config does not fit the app"):
        s.sign_app(pki.federation_key, app, {"no-such-key": 1})
    with pytest.raises(UserError, match="already holds app-signature"):
        s.sign_app(pki.federation_key, app, {s.SIGNATURE_KEY: "v1:1:x"})


def test_a_signature_starts_one_run_within_its_validity(tmp_path):
    """Attack: a signature recorded from one run (run configs are visible to whoever reaches the Control API)
    starts a second run of the same bundle."""
    ledger = s.SignatureLedger(tmp_path / "ledger.json")
    now = 1_800_000_000
    fresh = s.Signature(now - 60, "a" * 64)
    ledger.admit(fresh, run_id=7, now=now)
    ledger.admit(fresh, run_id=7, now=now + 10 * s.MAX_AGE_S)  # every later message of that run
    with pytest.raises(s.BundleRefused, match="already started Flower run 7"):
        ledger.admit(fresh, run_id=8, now=now)
    with pytest.raises(s.BundleRefused, match="h old and was never used here"):
        ledger.admit(s.Signature(now - s.MAX_AGE_S - 1, "b" * 64), run_id=9, now=now)
    with pytest.raises(s.BundleRefused, match="made in the future"):
        ledger.admit(s.Signature(now + s.CLOCK_SKEW_S + 1, "c" * 64), run_id=9, now=now)
    (tmp_path / "ledger.json").write_text("{")
    with pytest.raises(s.BundleRefused, match="damaged"):
        ledger.admit(s.Signature(now, "d" * 64), run_id=10, now=now)


def test_flower_pulls_the_task_before_it_installs_or_imports_the_bundle():
    """The verifying runner wraps `pull_task_input`; that is only a gate while Flower's `run_clientapp` calls it
    before `install_from_fab` and before loading the ClientApp."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    source = inspect.getsource(run_clientapp)
    pulled = source.index("pull_task_input(client)")
    assert pulled < source.index("install_from_fab(") < source.index("load_client_app_fn(")


def test_the_executor_takes_clientapp_tasks_only(tmp_path):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

    from medsyngan.federated.hospital_node import VerifyingExecutor

    executor = VerifyingExecutor(s.AppTrust(tmp_path / "federation_app.pub", tmp_path / "ledger.json"))
    assert executor.get_eligible_capacity(set(TaskType)) == ({TaskType.CLIENT_APP}, set())
    for task_type in set(TaskType) - {TaskType.CLIENT_APP}:
        spec = ExecutionSpec(task_type=task_type, runtime_api_address="127.0.0.1:1", token="ab", insecure=True,
                             root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                             suppress_output=False, task_id=1)
        assert executor.launch(spec).status == LaunchResultStatus.FAILED
    assert executor.children == []


def _hospital(tmp_path: Path, pki, hospital_id: int = 0, trust: tuple[str, ...] = ("ca.crt", "aggregator_x25519.pub",
                                                                                   "federation_app.pub")) -> HospitalDir:
    hospital = hospital_init(tmp_path / f"hospital-{hospital_id}", hospital_id)
    for name in trust:
        (hospital.root / name).write_bytes((pki.trust_dir / name).read_bytes())
    return hospital


def test_a_hospital_without_the_aggregator_pin_refuses_to_start(tmp_path):
    """Attack: the relay announces an aggregator key of its own to a hospital that pins none, and reads its
    updates. A deployed hospital without the pin refuses to start, in one line."""
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospital = _hospital(tmp_path, pki, trust=("ca.crt", "federation_app.pub"))
    (tmp_path / "data").mkdir()
    home = tmp_path / "node"
    start = [sys.executable, "-m", "medsyngan.cli", "hospital", "start", "--hospital-dir", str(hospital.root),
             "--superlink", "127.0.0.1:1", "--data-path", str(tmp_path / "data"), "--home", str(home)]
    refused = subprocess.run(start, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "aggregator key pin" in refused.stderr
    assert not home.exists()  # refused before anything was made or started

    from medsyngan.federated.client import node_identity
    from medsyngan.federated.protocol import Job

    with pytest.raises(UserError, match="no aggregator-public"):
        node_identity({"hospital-id": 0, "data-path": "/data"}, Job(config="", run_id="r"))


def test_a_hospital_without_the_federation_key_refuses_to_start(tmp_path):
    """Attack: a node with no federation key to check signatures against, which could only run bundles unchecked."""
    from medsyngan.federated.hospital_node import HospitalNode

    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    (tmp_path / "data").mkdir()
    hospital = _hospital(tmp_path, pki, trust=("ca.crt", "aggregator_x25519.pub"))
    with pytest.raises(UserError, match="federation key .* not found"):
        HospitalNode(hospital, "127.0.0.1:1", tmp_path / "data", tmp_path / "node").check()
    (hospital.root / "federation_app.pub").write_bytes((pki.trust_dir / "federation_app.pub").read_bytes())
    HospitalNode(hospital, "127.0.0.1:1", tmp_path / "data", tmp_path / "node").check()


# --- the aggregator's roster -------------------------------------------------------------------------------------


class KeyedGrid:
    """A deployment's grid as the ServerApp sees it: each node with the key Flower authenticated it with, answering
    hello with the hospital it claims to be; it records every message each node was sent."""

    def __init__(self, nodes: dict[int, tuple[bytes, int]]):
        self.nodes = nodes
        self.sent: dict[int, list[str]] = {n: [] for n in nodes}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, public_key=pem) for n, (pem, _) in self.nodes.items()]

    def send_and_receive(self, messages, *, timeout=None):
        from uuid import uuid4

        from flwr.app import Message

        from medsyngan.federated import protocol as p

        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.sent[node].append(message.metadata.message_type)
            message.metadata.__dict__["_message_id"] = uuid4().hex
            reply = Message(p.Hello(self.nodes[node][1], 10, 5, 2).to_record(), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_the_roster_comes_from_the_manifest_not_from_the_nodes(tmp_path, medsyngan_cache, caplog, monkeypatch):
    """Attacks: a node whose key is not in the manifest (registered at the SuperLink by whoever reached its
    Control API) asks for work; a registered hospital claims another hospital's id."""
    from flwr.supercore.task_identity import TaskIdentity

    from medsyngan.config import load_config
    from medsyngan.federated.server import RoundDriver
    from medsyngan.rundir import RunDir
    from medsyngan.workflows.federation import prepare_job

    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospitals = [hospital_init(tmp_path / f"h{k}", k) for k in range(3)]
    for k, hospital in enumerate(hospitals):
        add_hospital(pki, k, hospital.auth_pub)
    keys = [_pem(serialization.load_ssh_public_key(h.auth_pub.read_bytes())) for h in hospitals]
    stranger = _pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    grid = KeyedGrid({100: (keys[0], 0), 101: (keys[1], 1), 102: (keys[2], 0), 103: (stranger, 2)})

    cfg = load_config("federated-dcgan64", ["model.ngf=8", "model.ndf=8", "federated.hospitals=3", "federated.quorum=2",
                                            "privacy.encrypt=false", "privacy.secagg=false"])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    driver = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=False, simulation=False), False, None,
                         HospitalKeys.from_manifest(pki.manifest))
    monkeypatch.setattr(logging.getLogger("medsyngan"), "propagate", True)  # the run's log handler stops it
    with caplog.at_level(logging.WARNING, logger="medsyngan.federated"):
        driver.hello(grid)
    assert driver.roster == {0: 100, 1: 101}
    assert grid.sent[103] == []  # the unknown key is never even greeted
    assert grid.sent[102] == ["query.hello"]  # the liar is heard once, then left out
    assert "node 103: its key is no hospital of this run" in caplog.text
    assert "node 102 claims hospital 0 but its key is hospital 2's" in caplog.text


# --- the SuperLink's one port ------------------------------------------------------------------------------------


def test_every_superlink_route_belongs_to_exactly_one_listed_api():
    """The list of which path is which API (and so what the proxy publishes) matches the installed Flower: an
    upgrade that adds or moves a route fails here."""
    from medsyngan.federated.superlink_routes import API_ROUTES, installed_routes

    routes = installed_routes()
    unlisted = [path for path in routes if sum(api.matches(path) for api in API_ROUTES) != 1]
    assert unlisted == [], f"SuperLink routes in no API (or in two) of superlink_routes.API_ROUTES: {unlisted}"
    for api in API_ROUTES:
        for listed in api.paths:
            assert any(path == listed or listed.endswith("/") and path.startswith(listed) for path in routes), \
                f"{api.name}: no route of the installed SuperLink under {listed}"


def test_the_proxy_publishes_fleet_to_all_control_to_the_operator_and_nothing_else():
    from medsyngan.federated.superlink_routes import nginx_config

    text = nginx_config("0.0.0.0:9093", 9092, "superlink.example", "/p/superlink.crt", "/p/superlink.key",
                        "/p/ca.crt", ["10.0.0.5"])
    blocks = dict(re.findall(r"^    location (?:\^~ |= )?(\S+) \{.*?\n(.*?)^    \}", text, flags=re.M | re.S))
    assert set(blocks) == {"/v1/fleet/", "/v1/control/", "/"}
    assert "deny" not in blocks["/v1/fleet/"] and "proxy_pass https://127.0.0.1:9092;" in blocks["/v1/fleet/"]
    assert "allow 10.0.0.5;\n        deny all;" in blocks["/v1/control/"]
    assert "return 404;" in blocks["/"] and "proxy_pass" not in blocks["/"]
    with pytest.raises(ValueError, match="operator address"):
        nginx_config("0.0.0.0:9093", 9092, "s", "c", "k", "ca", [])
