"""Flower Deployment Engine on loopback: a SuperLink with TLS and SuperNode authentication, three hospitals'
SuperNodes as separate processes, an unregistered SuperNode that must be refused, and a SuperNode killed in the
middle of a round while the run still finishes with a quorum of 2 of 3. Every process started is stopped, and
the test checks that none is left running."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medsyngan.errors import UserError
from medsyngan.federated import deploy
from medsyngan.federated.pki import init_pki

ECHO_APP = Path(__file__).parent / "fixtures" / "flwr_echo_app"


@pytest.fixture
def processes():
    """Every ManagedProcess the test starts; teardown stops them all and fails on any survivor."""
    started: list[deploy.ManagedProcess] = []
    yield started
    leftovers = deploy.stop_all(started)
    assert leftovers == [], f"processes left running: {leftovers}"


def test_missing_certificate_is_one_line_error_before_start(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1", 1)
    with pytest.raises(UserError, match=r"^superlink key .*/nowhere.key not found; create it with `medsyngan pki init`"):
        deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, tmp_path / "nowhere.key")
    assert not (tmp_path / "superlink").exists()


def test_unreachable_superlink_is_a_clear_message(tmp_path):
    pki = init_pki(tmp_path / "pki", "127.0.0.1", 1)
    port = deploy.free_port()  # nothing listens there
    with pytest.raises(UserError, match=rf"SuperLink 127.0.0.1:{port} cannot be reached"):
        deploy.start_supernode(
            tmp_path, f"127.0.0.1:{port}", pki.ca_cert, pki.hospital_key(0), 0, tmp_path, runtime_port=deploy.free_port(),
            probe_timeout=1.0,
        )
    assert not (tmp_path / "hospital-0").exists()


def test_data_path_with_quote_is_rejected():
    with pytest.raises(UserError, match="single quote"):
        deploy.node_config(0, "/data/o'brien")


@pytest.mark.slow
def test_loopback_federation_tls_auth_quorum(tmp_path, processes):
    pki = init_pki(tmp_path / "pki", "127.0.0.1", hospitals=4)  # hospital 3 is never registered
    port = deploy.free_port()
    address = f"127.0.0.1:{port}"
    superlink = deploy.start_superlink(tmp_path, pki.ca_cert, pki.server_cert, pki.server_key, port=port)
    processes.append(superlink)

    cli_home = tmp_path / "cli"
    deploy.write_connection(cli_home, address, pki.ca_cert)
    node_ids = deploy.register_hospitals(cli_home, {f"hospital-{k}": pki.hospital_pub(k) for k in range(3)})
    assert len(set(node_ids.values())) == 3

    nodes = {}
    for k in range(4):
        proc = deploy.start_supernode(
            tmp_path, address, pki.ca_cert, pki.hospital_key(k), k, tmp_path / f"data {k}", runtime_port=deploy.free_port()
        )
        processes.append(proc)
        nodes[k] = proc
    # The ServerApp itself waits for 3 SuperNodes, so the run is submitted while they are still starting.
    run = deploy.start_run(
        cli_home, ECHO_APP, tmp_path / "flwr-run.log",
        # Each ClientApp holds its reply for a few seconds so that hospital 2 dies mid-round; the round then ends at
        # its timeout with the 2 replies it has (a SIGKILLed node stays "online" for Flower for up to 60 s).
        {"num-rounds": 2, "quorum": 2, "min-nodes": 3, "round-timeout-s": 30.0, "client-delay-s": 3.0},
    )
    processes.append(run)
    for k in range(3):
        assert deploy.wait_supernode(nodes[k]) == node_ids[f"hospital-{k}"]

    # The unregistered hospital: the SuperLink refuses its key and the SuperNode exits with an error.
    with pytest.raises(UserError, match="refused by the SuperLink"):
        deploy.wait_supernode(nodes[3])
    assert nodes[3].wait(30) != 0
    assert "No SuperNode found with the given public key" in superlink.log_text()

    assert run.wait_for(r"ECHO round=1 replies=3/3 hospitals=\[0, 1, 2\]", 120), run.log_tail()
    nodes[2].kill()
    assert run.wait_for(r"ECHO done", 120, until_exit=True), run.log_tail()
    assert run.wait(30) == 0, run.log_tail()
    log = run.log_text()
    assert re.search(r"ECHO round=2 replies=2/3 hospitals=\[0, 1\]", log), log
    assert re.search(r"paths=\['[^']*/data 0', '[^']*/data 1'\]", log), log  # paths with a space arrive intact
