"""Flower Deployment Engine on loopback with MedSynGAN's own ServerApp/ClientApp: a SuperLink with TLS and
SuperNode authentication, three hospitals' SuperNodes as separate processes training a tiny DCGAN for 2 rounds,
an unregistered SuperNode that must be refused, and a SuperNode killed (SIGKILL, as a crash) in the middle of a
round while the run still finishes with a quorum of 2 of 3. Every process started is stopped, and the test checks
that none is left running."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from medsyngan.errors import UserError
from medsyngan.federated import deploy
from medsyngan.federated.processes import ManagedProcess, descendants, free_port, stop_all
from medsyngan.federated.pki import init_pki

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


@pytest.fixture
def processes():
    """Every ManagedProcess the test starts; teardown stops them all and fails on any survivor."""
    started: list[ManagedProcess] = []
    yield started
    leftovers = stop_all(started)
    assert leftovers == [], f"processes left running: {leftovers}"


def test_missing_certificate_is_one_line_error_before_start(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1", 1)
    with pytest.raises(UserError, match=r"^superlink key .*/nowhere.key not found; create it with `medsyngan pki init`"):
        deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, tmp_path / "nowhere.key")
    assert not (tmp_path / "superlink").exists()


def test_unreachable_superlink_is_a_clear_message(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1", 1)
    port = free_port()  # nothing listens there
    with pytest.raises(UserError, match=rf"SuperLink 127.0.0.1:{port} cannot be reached"):
        deploy.start_supernode(
            tmp_path, f"127.0.0.1:{port}", pki.ca_cert, pki.hospital_key(0), 0, tmp_path, runtime_port=free_port(),
            probe_timeout=1.0,
        )
    assert not (tmp_path / "hospital-0").exists()


def test_node_config_round_trips_through_flowers_parser():
    from flwr.common.config import parse_config_args

    text = deploy.node_config(1, "/data/site a", "/state dir", "/pki/aggregator_x25519.pub")
    assert parse_config_args([text]) == {
        "hospital-id": 1, "data-path": "/data/site a", "state-dir": "/state dir",
        "aggregator-public": "/pki/aggregator_x25519.pub",
    }
    with pytest.raises(UserError, match="single quote"):
        deploy.node_config(0, "/data/o'brien")


def test_run_config_round_trips_and_needs_the_key_when_encrypting(tmp_path):
    from flwr.common.config import parse_config_args

    plain = deploy.medsyngan_run_config("federated-dcgan64", ["privacy.encrypt=false", "federated.rounds=2"], tmp_path)
    assert parse_config_args([deploy.run_config_arg(plain)]) == plain
    assert plain["overrides"] == "privacy.encrypt=false federated.rounds=2" and "aggregator-key" not in plain
    with pytest.raises(UserError, match="aggregator"):
        deploy.medsyngan_run_config("federated-dcgan64", [], tmp_path)
    pki = init_pki(tmp_path / "pki", "127.0.0.1", 1)
    encrypted = deploy.medsyngan_run_config("federated-dcgan64", [], tmp_path, aggregator_key=pki.aggregator_key)
    assert encrypted["aggregator-key"] == str(pki.aggregator_key.resolve())
    with pytest.raises(UserError, match="unknown key 'model.bogus'"):
        deploy.medsyngan_run_config("federated-dcgan64", ["model.bogus=1"], tmp_path)


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
    """Until this SuperNode is computing: Flower starts a `flwr-clientapp` process per message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(node.pid):
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return
            except OSError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"{node.name} never started its ClientApp; see {node.log_path}")


@pytest.mark.slow
def test_loopback_federation_tls_auth_quorum(tmp_path, processes):
    from medsyngan.data.api import phantom_dataset

    data = [phantom_dataset(12, 2, 32, seed=10 + k, root=tmp_path / f"data {k}").root for k in range(3)]
    pki = init_pki(tmp_path / "pki", "127.0.0.1", hospitals=4)  # hospital 3 is never registered
    port = free_port()
    address = f"127.0.0.1:{port}"
    superlink = deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, pki.server_key, port=port)
    processes.append(superlink)

    cli_home = tmp_path / "cli"
    deploy.write_connection(cli_home, address, pki.ca_cert)
    node_ids = deploy.register_hospitals(cli_home, {f"hospital-{k}": pki.hospital_pub(k) for k in range(3)})
    assert len(set(node_ids.values())) == 3

    # Each hospital's own policy must allow what TINY asks for; without one it would hold the product defaults.
    policy = tmp_path / "policy.toml"
    policy.write_text("dp_required = false\nencrypt_required = false\nsecagg_required = false\n")
    nodes = {}
    for k in range(4):
        proc = deploy.start_supernode(
            tmp_path, address, pki.ca_cert, pki.hospital_key(k), k, data[min(k, 2)],
            runtime_port=free_port(), state_dir=tmp_path / "hospital-state", policy=policy,
        )
        processes.append(proc)
        nodes[k] = proc
    # The ServerApp itself waits for the hospitals, so the run is submitted while the SuperNodes still start.
    run_dir = tmp_path / "run"
    run = deploy.start_run(
        cli_home, REPO, tmp_path / "flwr-run.log", deploy.medsyngan_run_config("federated-dcgan64", TINY, run_dir)
    )
    processes.append(run)
    for k in range(3):
        assert deploy.wait_supernode(nodes[k], timeout=120) == node_ids[f"hospital-{k}"]

    # The unregistered hospital: the SuperLink refuses its key and the SuperNode exits with an error.
    with pytest.raises(UserError, match="refused by the SuperLink"):
        deploy.wait_supernode(nodes[3])
    assert nodes[3].wait(30) != 0
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
