"""Flower Deployment Engine on loopback with real processes: a SuperLink with TLS and SuperNode authentication and
hospitals started with `medsyngan hospital start`.

- Signed bundles: a hostile app that leaves a marker wherever its code runs is submitted unsigned, signed with
  another key, and changed after signing; the hospital answers each with an error and the marker never appears.
  Signed with the federation's key, the same app runs (so the marker would appear if the checks let it through).
- A federation: three hospitals' nodes train a tiny DCGAN for 2 rounds; a node whose key the SuperLink accepts but
  the manifest does not name gets no work; a node whose key was never registered is refused by the SuperLink; a
  node killed (SIGKILL, as a crash) in the middle of a round leaves the run to finish with a quorum of 2 of 3.
Every process started is stopped, and the tests check that none is left running."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bundles import read_report, write_probe_app
from medsyngan.errors import UserError
from medsyngan.federated import deploy
from medsyngan.federated.hospital_keys import HospitalDir, add_hospital, hospital_init
from medsyngan.federated.pki import Pki, init_pki
from medsyngan.federated.processes import ManagedProcess, descendants, free_port, stop_all

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.resolution=32", "data.size=32", "model.ngf=8", "model.ndf=8", "train.batch_size=8", "run.threads=1",
    "federated.hospitals=3", "federated.quorum=2", "federated.rounds=2", "federated.local_steps=2",
    "federated.eval_every=2", "eval.num_samples=16",
    # Only a safety net: Flower answers for a crashed SuperNode within 2 missed heartbeats (about 60 s).
    "federated.round_timeout_s=150",
    # This test is about the deployment mechanics; the privacy mechanisms have their own tests.
    "privacy.dp=false", "privacy.encrypt=false", "privacy.secagg=false", "privacy.quantize_bits=0", "privacy.update_clip=0",
]


def _hospital(root: Path, pki: Pki, hospital_id: int, in_manifest: bool = True) -> HospitalDir:
    """A hospital's folder as `pki hospital-init` makes it, with the operator's trust/ files copied in."""
    hospital = hospital_init(root / f"keys-{hospital_id}", hospital_id)
    for item in pki.trust_dir.iterdir():
        (hospital.root / item.name).write_bytes(item.read_bytes())
    if in_manifest:
        add_hospital(pki, hospital_id, hospital.auth_pub)
    return hospital


@pytest.fixture
def processes():
    """Every ManagedProcess the test starts; teardown stops them all and fails on any survivor."""
    started: list[ManagedProcess] = []
    yield started
    leftovers = stop_all(started)
    assert leftovers == [], f"processes left running: {leftovers}"


def test_missing_certificate_is_one_line_error_before_start(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    with pytest.raises(UserError, match=r"^superlink key .*/nowhere.key not found; create it with `medsyngan pki init`"):
        deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, tmp_path / "nowhere.key")
    assert not (tmp_path / "superlink").exists()


def test_unreachable_superlink_is_a_clear_message(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospital = _hospital(tmp_path, pki, 0)
    port = free_port()  # nothing listens there
    with pytest.raises(UserError, match=rf"SuperLink 127.0.0.1:{port} cannot be reached"):
        deploy.start_hospital(tmp_path, "hospital-0", hospital.root, f"127.0.0.1:{port}", tmp_path,
                              runtime_port=free_port(), probe_timeout=1.0)
    assert not (tmp_path / "hospital-0").exists()


def test_node_config_round_trips_through_flowers_parser():
    from flwr.common.config import parse_config_args

    text = deploy.node_config(1, "/data/site a", state_dir="/state dir", aggregator_public="/pki/aggregator_x25519.pub")
    assert parse_config_args([text]) == {
        "hospital-id": 1, "data-path": "/data/site a", "state-dir": "/state dir",
        "aggregator-public": "/pki/aggregator_x25519.pub",
    }
    with pytest.raises(UserError, match="single quote"):
        deploy.node_config(0, "/data/o'brien")


def test_run_config_round_trips_names_the_manifest_and_needs_the_key_when_encrypting(tmp_path):
    from flwr.common.config import parse_config_args

    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    with pytest.raises(UserError, match="lists no hospitals"):
        deploy.medsyngan_run_config("federated-dcgan64", ["privacy.encrypt=false"], tmp_path, pki.manifest)
    _hospital(tmp_path, pki, 0)
    plain = deploy.medsyngan_run_config("federated-dcgan64", ["privacy.encrypt=false", "federated.rounds=2"], tmp_path,
                                        pki.manifest)
    assert parse_config_args([deploy.run_config_arg(plain)]) == plain
    assert plain["overrides"] == "privacy.encrypt=false federated.rounds=2" and "aggregator-key" not in plain
    assert plain["manifest"] == str(pki.manifest.resolve())
    with pytest.raises(UserError, match="aggregator"):
        deploy.medsyngan_run_config("federated-dcgan64", [], tmp_path, pki.manifest)
    encrypted = deploy.medsyngan_run_config("federated-dcgan64", [], tmp_path, pki.manifest,
                                            aggregator_key=pki.aggregator_key)
    assert encrypted["aggregator-key"] == str(pki.aggregator_key.resolve())
    with pytest.raises(UserError, match="unknown key 'model.bogus'"):
        deploy.medsyngan_run_config("federated-dcgan64", ["model.bogus=1"], tmp_path, pki.manifest)


def _superlink(tmp_path: Path, pki: Pki, processes: list, hospitals: dict[str, Path]) -> tuple[str, Path, dict[str, int]]:
    """A SuperLink on a free loopback port, a flwr CLI connection to it, and ``hospitals`` registered there."""
    port = free_port()
    processes.append(deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, pki.server_key, port=port))
    cli_home = tmp_path / "cli"
    deploy.write_connection(cli_home, f"127.0.0.1:{port}", pki.ca_cert)
    return f"127.0.0.1:{port}", cli_home, deploy.register_hospitals(cli_home, hospitals)


@pytest.mark.slow
def test_a_hospital_runs_only_bundles_signed_with_the_federation_key(tmp_path, processes):
    """Attack: whoever reaches the SuperLink's Control API submits a bundle of their own with `flwr run`, and a
    stock SuperNode installs and imports it next to the hospital's images. Each hostile variant must end with an
    error reply from the hospital and no trace of its code there."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from medsyngan.federated.app_signing import SIGNATURE_KEY, build_fab, fused_run_config, load_signing_key, sign

    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospital = _hospital(tmp_path, pki, 0)
    address, cli_home, _ = _superlink(tmp_path, pki, processes, {"hospital-0": pki.hospital_pub(0)})
    (tmp_path / "data").mkdir()
    node = deploy.start_hospital(tmp_path, "hospital-0", hospital.root, address, tmp_path / "data",
                                 runtime_port=free_port())
    processes.append(node)
    deploy.wait_supernode(node, timeout=120)

    def submit(name: str, sign_with=None, change_after_signing: bool = False) -> tuple[str, Path]:
        marker, report = tmp_path / f"{name}.marker", tmp_path / f"{name}.report.json"
        app = write_probe_app(tmp_path / name, marker, report)
        config = {SIGNATURE_KEY: sign_with(app)} if sign_with else None
        if change_after_signing:
            (app / "probe_client.py").write_text((app / "probe_client.py").read_text() + "\n# changed after signing\n")
        run = deploy.start_run(cli_home, app, tmp_path / f"{name}.log", config)
        processes.append(run)
        assert run.wait(240) == 0, run.log_tail()
        answers = read_report(report)
        assert len(answers) == 1, answers
        return next(iter(answers.values())), marker

    def signed_by(key):
        return lambda app: sign(key, build_fab(app), fused_run_config(build_fab(app), {}))

    federation_key = load_signing_key(pki.federation_key)
    cases = {
        "unsigned": ({}, "carries no app-signature"),
        "other-key": ({"sign_with": signed_by(ed25519.Ed25519PrivateKey.generate())}, "does not match its signature"),
        "changed": ({"sign_with": signed_by(federation_key), "change_after_signing": True}, "does not match its signature"),
    }
    for name, (how, reason) in cases.items():
        answer, marker = submit(name, **how)
        assert answer.startswith("app bundle refused") and reason in answer, (name, answer)
        assert not marker.exists(), f"{name}: code from the bundle ran at the hospital"
    assert not list((tmp_path / "hospital-0" / "flwr").glob("apps/*")), "a refused bundle was installed"

    # The same app signed with the federation's key runs: the marker is what a bundle's code leaves behind.
    answer, marker = submit("signed", sign_with=signed_by(federation_key))
    assert answer == "ran" and marker.exists()


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _wait_rows(run_dir: Path, run: ManagedProcess, done, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while not done(rows := _rows(run_dir)):
        assert run.alive(), f"flwr run ended early:\n{run.log_tail()}"
        assert time.monotonic() < deadline, f"timed out; metrics so far {rows}\n{run.log_tail()}"
        time.sleep(0.5)
    return rows


def _wait_clientapp(node: ManagedProcess, timeout: float) -> None:
    """Until this hospital is computing: its node starts a verifying ClientApp process per message."""
    from medsyngan.federated.hospital_node import RUNNER_MODULE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(node.pid):
            try:
                if RUNNER_MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"{node.name} never started its ClientApp; see {node.log_path}")


@pytest.mark.slow
def test_loopback_federation_tls_auth_identity_quorum(tmp_path, processes):
    from medsyngan.data.api import phantom_dataset

    data = [phantom_dataset(12, 2, 32, seed=10 + k, root=tmp_path / f"data {k}").root for k in range(3)]
    pki = init_pki(tmp_path / "pki", "127.0.0.1")
    hospitals = {k: _hospital(tmp_path, pki, k, in_manifest=k < 3) for k in range(5)}
    # Hospital 3's key is registered at the SuperLink (as anyone with the Control API could) but is in no
    # manifest entry; hospital 4's key is registered nowhere.
    address, cli_home, node_ids = _superlink(tmp_path, pki, processes,
                                             {f"hospital-{k}": hospitals[k].auth_pub for k in range(4)})
    assert len(set(node_ids.values())) == 4

    # Each hospital's own policy must allow what TINY asks for; without one it would hold the product defaults.
    policy = tmp_path / "policy.toml"
    policy.write_text("dp_required = false\nencrypt_required = false\nsecagg_required = false\n")
    nodes = {}
    for k, hospital in hospitals.items():
        nodes[k] = deploy.start_hospital(tmp_path, f"hospital-{k}", hospital.root, address, data[min(k, 2)],
                                         runtime_port=free_port(), state_dir=tmp_path / "hospital-state", policy=policy)
        processes.append(nodes[k])
    # The ServerApp itself waits for the hospitals, so the run is submitted while the SuperNodes still start.
    run_dir = tmp_path / "run"
    config = deploy.medsyngan_run_config("federated-dcgan64", TINY, run_dir, pki.manifest)
    run = deploy.start_run(cli_home, REPO, tmp_path / "flwr-run.log",
                           deploy.signed_run_config(config, pki.federation_key, REPO))
    processes.append(run)
    for k in range(4):
        assert deploy.wait_supernode(nodes[k], timeout=120) == node_ids[f"hospital-{k}"]

    # The unregistered hospital: the SuperLink refuses its key and its node exits with an error.
    with pytest.raises(UserError, match="refused by the SuperLink"):
        deploy.wait_supernode(nodes[4])
    assert nodes[4].wait(30) != 0
    superlink = processes[0]
    assert "No SuperNode found with the given public key" in superlink.log_text()

    rows = _wait_rows(run_dir, run, lambda rows: any(r.get("round") == 1 for r in rows), 300)
    assert rows[0]["hospitals_replied"] == [0, 1, 2]
    _wait_clientapp(nodes[2], 120)  # round 2 is in flight at hospital 2
    nodes[2].kill()

    assert run.wait(300) == 0, run.log_tail()
    train = [r for r in _rows(run_dir) if "hospitals_replied" in r]
    assert [r["round"] for r in train] == [1, 2]
    assert train[1]["hospitals_replied"] == [0, 1], train[1]
    assert json.loads((run_dir / "checkpoints" / "round-00002" / "meta.json").read_text())["last_round"] == {
        "0": 2, "1": 2, "2": 1
    }
    evaluation = [r for r in _rows(run_dir) if "eval" in r]
    assert evaluation and evaluation[-1]["eval_hospitals"] == 2
    assert "round 2/2: 2 hospitals" in " ".join(run.log_text().split())
    # The node the manifest does not name was connected throughout and never received a message.
    assert nodes[3].alive() and "Receiving:" not in nodes[3].log_text()
    assert f"node {node_ids['hospital-3']}: its key is no hospital of this run" in (run_dir / "run.log").read_text()
