"""MedSynGAN's Flower apps and how they are launched: the app declaration, the ServerApp's set-up from a run
config, and Flower's local simulation with its processes and its failures."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.federated.simulation import LogFollower, run_local_simulation, write_app
from medsyngan.rundir import RunDir
from medsyngan.workflows import federation

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.size=32", "model.resolution=32", "model.ngf=8", "model.ndf=8", "data.phantom_patients=12",
        "data.phantom_images_per_patient=2"]


def test_pyproject_declares_the_app_train_runs():
    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == federation.APP_COMPONENTS
    assert app["config"] == federation.APP_CONFIG


def test_a_written_app_passes_flowers_checks(tmp_path):
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    app = write_app(tmp_path / "app", "medsyngan", "0.1.0", federation.APP_COMPONENTS, federation.APP_CONFIG)
    config, warnings = load_and_validate(app / "pyproject.toml")
    assert config is not None and warnings == []
    assert build_fab_from_disk(app)


def test_server_setup_reads_a_prepared_job(tmp_path, medsyngan_cache):
    cfg = load_config("federated-dcgan64", TINY + ["federated.rounds=7"])
    run_dir = RunDir(tmp_path / "run").create(cfg)
    job = federation.prepare_job(cfg, run_dir, resume=False, simulation=True)
    job_file = tmp_path / "job.json"
    job_file.write_text(job.to_json())
    setup = federation.server_setup({"run-dir": str(run_dir.root), "job": str(job_file), "aggregator-key": "/k"})
    assert (setup.job, setup.cfg.federated.rounds, setup.resume, setup.identity_key) == (job, 7, False, "/k")
    assert job.partition == str(run_dir.root / "partition.csv") and Path(job.partition).is_file()
    job_file.write_text("{")
    with pytest.raises(UserError, match=r"^cannot read the job file .*job.json \(malformed job file: .*\); start"):
        federation.server_setup({"run-dir": str(run_dir.root), "job": str(job_file)})


def test_server_setup_resolves_a_preset_for_flwr_run(tmp_path, medsyngan_cache):
    run = tmp_path / "flwr-run"
    setup = federation.server_setup({"config": "federated-dcgan64", "overrides": " ".join(TINY), "run-dir": str(run)})
    assert setup.cfg.model.ngf == 8 and (run / "config.toml").is_file() and (run / "partition.csv").is_file()
    # A simulation on one machine makes its own aggregator key when updates are encrypted.
    assert setup.cfg.privacy.encrypt and setup.identity_key == str(run / "keys" / "aggregator_x25519.key")
    deployment = {"overrides": " ".join(TINY), "run-dir": str(tmp_path / "d"), "mode": "deployment"}
    with pytest.raises(UserError, match=r"^a deployment needs manifest="):
        federation.server_setup(deployment)
    from medsyngan.federated.hospital_keys import add_hospital, hospital_init
    from medsyngan.federated.pki import init_pki

    pki = init_pki(tmp_path / "pki", "localhost")
    add_hospital(pki, 0, hospital_init(tmp_path / "hospital-0", 0).auth_pub)
    deployed = federation.server_setup({**deployment, "manifest": str(pki.manifest)})
    assert deployed.job.partition is None and deployed.identity_key is None
    assert deployed.hospital_keys.by_fingerprint and set(deployed.hospital_keys.by_fingerprint.values()) == {0}


def test_the_follower_passes_on_whole_new_lines(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("before\n")
    lines: list[str] = []
    follower = LogFollower(log, lines.append)
    with open(log, "a") as fh:
        fh.write("first\nsec")
    follower.poll()
    with open(log, "a") as fh:
        fh.write("ond\n")
    follower.poll()
    assert lines == ["first", "second"]


PROBE_APP = '''
import time

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medsyngan.errors import UserError

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(context.run_config["log"], "a") as fh:
        fh.write(f"the server app saw {len(list(grid.get_node_ids()))} nodes\\n")
    if context.run_config["fail"]:
        raise UserError(context.run_config["fail"])
'''


def flower_processes(home: Path) -> list[int]:
    """Processes that run with this Flower home (the environment every started process inherits)."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("fail", ["", "no hospital can start; fix it"], ids=["completes", "fails"])
def test_local_simulation_reports_its_outcome_and_leaves_no_process(tmp_path, fail):
    app = write_app(tmp_path / "app", "probe", "1.0.0", {"serverapp": "probe_app:server_app",
                                                         "clientapp": "probe_app:client_app"},
                    {"log": "", "fail": ""})
    (app / "probe_app.py").write_text(PROBE_APP)
    log = tmp_path / "run.log"
    lines: list[str] = []
    home = tmp_path / "home"
    launch = (home, app, {"log": str(log), "fail": fail}, {"num-supernodes": 2}, LogFollower(log, lines.append))
    if fail:
        with pytest.raises(UserError, match=r"^no hospital can start; fix it \(Flower's log of the run: .*\)$"):
            run_local_simulation(*launch)
    else:
        run_local_simulation(*launch)
    assert lines == ["the server app saw 2 nodes"]
    assert flower_processes(home) == []


@pytest.mark.slow
def test_a_run_flower_refuses_is_one_user_error(tmp_path):
    app = write_app(tmp_path / "app", "probe", "1.0.0", {"serverapp": "probe_app:server_app",
                                                         "clientapp": "probe_app:client_app"}, {"log": ""})
    (app / "probe_app.py").write_text(PROBE_APP)
    home = tmp_path / "home"
    with pytest.raises(UserError, match=r"^`flwr run` submitted no run \(.*Invalid run configuration\.\); see "):
        run_local_simulation(home, app, {"undeclared": 1}, {"num-supernodes": 1},
                             LogFollower(tmp_path / "run.log", print))
    assert flower_processes(home) == []
