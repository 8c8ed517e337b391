"""Federated training on Flower's local simulation (a private SuperLink, `flwr run`, Ray), end to end on tiny
phantoms, through the real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medsyngan.federated.round_log import HOSPITAL_FIELDS
from federation_settings import WITHOUT_DP
from test_federated_apps import flower_processes

pytestmark = pytest.mark.slow

TINY = [
    "run.seed=3", "run.threads=1",
    "data.size=32", "model.resolution=32", "model.ngf=8", "model.ndf=8", "model.z_dim=16",
    "data.phantom_patients=24", "data.phantom_images_per_patient=2",
    "train.batch_size=8",
    "federated.hospitals=3", "federated.quorum=2", "federated.local_steps=2", "federated.eval_every=100",
    "eval.num_samples=16",
]


def _train(out: Path, *extra: str, resume: bool = False) -> subprocess.Popen:
    """A federated run in its own process group; resuming continues the run's own saved configuration."""
    args = [sys.executable, "-m", "medsyngan.cli", "train", "--out", str(out)]
    if resume:
        args.append("--resume")
    else:
        args += ["--config", "federated-dcgan64"]
        for item in TINY + list(extra):
            args += ["--set", item]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _until_none_left(run: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := flower_processes((run / "flower").resolve())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes of the simulation still running: {left}"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_label_skew_federation_with_the_default_privacy_completes(tmp_path, medsyngan_cache):
    """The product default: patient-level DP at ε = 1, 8-bit clipped updates, encryption, secure aggregation."""
    run = tmp_path / "skew"
    out = _finish(_train(run, "federated.scheme=label-skew", "federated.alpha=0.5", "federated.rounds=2",
                         "train.batch_size=4"))
    assert "deprecated" not in out.lower() and "Traceback" not in out
    assert "round 2/2" in out  # the aggregator's log reaches the terminal
    _until_none_left(run, 0)
    rows = [r for r in _rows(run) if "hospital" in r]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["hospital"]) >= 2
        for stats in row["hospital"].values():
            assert stats["bytes_received_from"] > 0 and stats["bytes_sent_to"] > 0
            assert set(stats) <= set(HOSPITAL_FIELDS)  # under DP and secure aggregation: its ε report, nothing else
            assert 0 < stats["epsilon"] <= 1.0 and stats["patient_level"] == 1.0
            # 8-bit masked updates: far fewer bytes back than the float32 model that went out.
            assert stats["bytes_received_from"] < 0.6 * stats["bytes_sent_to"]
    assert (run / "samples" / "round-00002.png").is_file()  # the server's grid at the final evaluation
    log = (run / "run.log").read_text()
    assert "off by choice" not in log
    assert (run / "checkpoints" / "round-00002" / "model.safetensors").is_file()
    assert (run / "partition.csv").is_file()


# DP noise comes from a secret seed drawn per run, so two separate runs differ by design; everything else
# (secure aggregation, quantization, encryption) is exercised by the exact-resume test.
DETERMINISTIC = ["federated.rounds=3", *WITHOUT_DP]


def test_killed_federation_resumes_to_the_same_weights(tmp_path, medsyngan_cache):
    reference = tmp_path / "reference"
    _finish(_train(reference, *DETERMINISTIC))

    killed = tmp_path / "killed"
    proc = _train(killed, *DETERMINISTIC)
    marker = killed / "checkpoints" / "round-00002" / "meta.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "round-00003").exists()
    # What Flower started in sessions of its own follows its killed parents (Flower's exit timeout is 5 s).
    _until_none_left(killed, 30)

    _finish(_train(killed, resume=True))
    a = load_file(str(reference / "checkpoints" / "round-00003" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "round-00003" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key


def test_sigterm_stops_the_federation_and_every_process_it_started(tmp_path, medsyngan_cache):
    run = tmp_path / "terminated"
    proc = _train(run, "federated.rounds=50", *WITHOUT_DP)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher alone, as a scheduler or `kill` would
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in out, out[-3000:]
    _until_none_left(run, 0)
