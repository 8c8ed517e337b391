"""Exact accounting under faults: a hospital killed before training, mid-training, during its mean-image release or
after sending, then asked to retry the round. Its ledger must never under-count what actually ran (an independent
count of the private steps and releases that touched data), and a retried round must draw fresh batches and fresh
noise. An identical repeated request gets the cached reply and is charged nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from uuid import uuid4

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medsyngan.config import load_config
from medsyngan.federated import protocol as p
from medsyngan.federated.client import FileLedger, node_identity
from medsyngan.federated.client_app import make_client_app
from medsyngan.privacy import moments
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.privacy.session import DPSession
from medsyngan.rundir import RunDir
from medsyngan.training.step import GANTrainer
from medsyngan.workflows.federation import prepare_job

TINY = ["data.size=32", "model.resolution=32", "model.ngf=8", "model.ndf=8", "model.z_dim=16", "run.threads=1",
        "train.batch_size=4", "train.amp=off", "data.phantom_patients=24", "data.phantom_images_per_patient=2",
        "federated.hospitals=2", "federated.quorum=1", "federated.rounds=10", "federated.local_steps=2",
        "federated.holdout_fraction=0", "privacy.dp=true", "privacy.target_epsilon=20", "privacy.mean_image_size=4",
        "privacy.mean_image_noise=4", "privacy.encrypt=false", "privacy.secagg=false", "privacy.quantize_bits=0",
        "hospital.max_epsilon=20", "hospital.encrypt_required=false", "hospital.secagg_required=false"]


IDENTITY = (("_task_id", 1), ("_run_id", 1), ("_node_id", 1))


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """The identity Flower gives the process that runs an app (messages are stamped with it)."""
    for field, value in IDENTITY:
        monkeypatch.setattr(TaskIdentity, field, value)


class Injected(RuntimeError):
    """The fault: an exception where a crash would be."""


class Witness:
    """An independent count of what touched data: private steps (per-sample gradients computed), releases
    begun, and the batch and noise indices used."""

    def __init__(self, monkeypatch):
        self.steps = self.releases = 0
        self.batches: list[int] = []
        self.noise: list[int] = []
        self.fail_at_step: int | None = None
        self.fail_in_release = False
        release, indices, noise = moments.release_mean_image, PoissonUnitSampler.indices, DPSession.noise_generator

        def counted_release(*args, **kwargs):
            self.releases += 1
            if self.fail_in_release:
                raise Injected("killed during the mean-image release")
            return release(*args, **kwargs)

        def counted_indices(sampler, t):
            self.batches.append(t)
            return indices(sampler, t)

        def counted_noise(session, index):
            self.steps += 1
            self.noise.append(index)
            if self.fail_at_step is not None and self.steps == self.fail_at_step:
                raise Injected("killed mid-training")
            return noise(session, index)

        monkeypatch.setattr(moments, "release_mean_image", counted_release)
        monkeypatch.setattr(PoissonUnitSampler, "indices", counted_indices)
        monkeypatch.setattr(DPSession, "noise_generator", counted_noise)


class HospitalNode:
    """Hospital 0's ClientApp with its own Flower context, fed training instructions directly."""

    def __init__(self, tmp_path: Path, resume: bool = False):
        self.cfg = load_config("federated-dcgan64", TINY)
        self.run_dir = RunDir(tmp_path / "run").create(self.cfg, resume=resume)
        self.job = prepare_job(self.cfg, self.run_dir, resume=resume, simulation=True)
        self.app = make_client_app(lambda fake, holdout: {})
        self.node_config = {"partition-id": 0, "num-partitions": 2}
        self.context = Context(run_id=1, node_id=100, state=RecordDict(), run_config={}, node_config=self.node_config)
        trainer = GANTrainer(self.cfg, device="cpu")
        self.weights = {k: v for k, v in trainer.model_state(("G", "D")).items() if v.is_floating_point()}

    def instruction(self, round_: int, resume: int, attempt: bytes = b"") -> p.Instruction:
        # round_public stands for what differs between two attempts of a round (fresh keys); unencrypted, unused.
        terms = p.RoundInstruction(round_, resume, attempt or None)
        return p.Instruction(self.job, terms, dict(self.weights))

    def send(self, instruction: p.Instruction) -> Message:
        message = Message(instruction.to_record(), dst_node_id=100, message_type=p.TRAIN)
        message.metadata.__dict__["_message_id"] = uuid4().hex
        return self.app(message, self.context)

    def ledger(self) -> dict:
        return FileLedger(node_identity(self.node_config, self.job)).read()


def charged(ledger: dict) -> tuple[int, int]:
    """(private steps, releases) the ledger charged."""
    total = sum(n for _, _, n in ledger["accountant"]["history"])
    return total - ledger["releases"], ledger["releases"]


def attempt(node: HospitalNode, round_: int, resume: int, raises: bool) -> Message | None:
    if raises:
        with pytest.raises(Injected):
            node.send(node.instruction(round_, resume, os.urandom(8)))
        return None
    reply = node.send(node.instruction(round_, resume, os.urandom(8)))
    assert not reply.has_error(), reply.error.reason
    return reply


@pytest.mark.parametrize("fault", ["before training", "mid-training", "during the release", "after sending"])
def test_a_killed_and_retried_round_is_never_under_counted(tmp_path, medsyngan_cache, monkeypatch, fault):
    """Attack: crash a hospital at any point of round 1 (where its mean image is released) and of round 2 (DP-SGD
    steps only), and have the round retried: the ledger must hold at least every step and release that ran, and
    the retries must not reuse a batch or a noise draw."""
    node = HospitalNode(tmp_path)
    witness = Witness(monkeypatch)
    for round_, resume in ((1, 0), (2, 1)):
        if fault == "before training":
            monkeypatch.setattr(GANTrainer, "train_step", _raise_once(monkeypatch, GANTrainer.train_step))
        witness.fail_at_step = witness.steps + 2 if fault == "mid-training" else None
        witness.fail_in_release = fault == "during the release" and round_ == 1
        crashes = fault in ("before training", "mid-training") or witness.fail_in_release
        attempt(node, round_, resume, raises=crashes)
        witness.fail_at_step, witness.fail_in_release = None, False
        attempt(node, round_, resume, raises=False)  # the retry, which completes
        steps, releases = charged(node.ledger())
        assert steps >= witness.steps and releases >= witness.releases, (fault, round_, steps, witness.steps)
        # An exception in the hospital's own process is settled exactly: nothing charged that did not run.
        assert (steps, releases) == (witness.steps, witness.releases)
    # 2 private steps per round: what each failed attempt ran before it stopped, then the retries' own.
    assert (witness.steps, witness.releases) == {"before training": (4, 1), "mid-training": (8, 1),
                                                 "during the release": (7, 2), "after sending": (8, 1)}[fault]
    assert len(set(witness.batches)) == len(witness.batches), witness.batches  # fresh batches on every retry
    assert len(set(witness.noise)) == len(witness.noise), witness.noise  # fresh noise on every retry


def _raise_once(monkeypatch, original):
    def failing(self, next_real):
        monkeypatch.setattr(GANTrainer, "train_step", original)
        raise Injected("killed before training")

    return failing


def test_an_identical_repeated_request_gets_the_cached_reply_and_costs_nothing(tmp_path, medsyngan_cache,
                                                                              monkeypatch):
    """Attack: a relay (or Flower's redelivery) sends the same training request twice; computing it again would
    spend privacy twice on the same release."""
    node = HospitalNode(tmp_path)
    witness = Witness(monkeypatch)
    instruction = node.instruction(1, 0, b"same")
    first = node.send(instruction)
    before = (witness.steps, witness.releases, node.ledger())
    again = node.send(instruction)
    assert not again.has_error()
    assert (witness.steps, witness.releases, node.ledger()) == before
    one, two = p.TrainReply.from_record(first.content), p.TrainReply.from_record(again.content)
    assert one.metrics == two.metrics and all(torch.equal(one.payload[k], two.payload[k]) for k in one.payload)
    # Anything else about the request (here the attempt's key) makes it a new request, charged as such.
    node.send(node.instruction(1, 0, b"other"))
    assert witness.steps == 2 * before[0] and charged(node.ledger())[0] == witness.steps


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_privacy_faults import IDENTITY, HospitalNode, TaskIdentity
    from medsyngan.privacy.session import DPSession

    for field, value in IDENTITY:
        setattr(TaskIdentity, field, value)

    counter = Path({counter!r})
    noise = DPSession.noise_generator

    def counted(session, index):
        with open(counter, "a") as fh:  # the independent count, on disk before the step touches data
            fh.write(f"{{index}}\\n"); fh.flush(); os.fsync(fh.fileno())
        if len(counter.read_text().split()) == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
        return noise(session, index)

    DPSession.noise_generator = counted
    node = HospitalNode(Path({tmp!r}))
    node.send(node.instruction(1, 0, b"child"))
""")


def test_a_hospital_killed_by_sigkill_mid_round_keeps_what_it_spent(tmp_path, medsyngan_cache, monkeypatch):
    """Attack: SIGKILL the hospital's process in the middle of a round (no exception handler runs), then retry the
    round in a new process: the steps charged up front stay charged, and the retry charges its own."""
    counter = tmp_path / "steps-run"
    code = CHILD.format(tests=str(Path(__file__).parent), counter=str(counter), kill_at=2, tmp=str(tmp_path))
    child = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]
    ran_before_kill = len(counter.read_text().split())
    node = HospitalNode(tmp_path, resume=True)
    steps, releases = charged(node.ledger())
    assert ran_before_kill == 2 and steps >= ran_before_kill and releases == 1
    witness = Witness(monkeypatch)
    attempt(node, 1, 0, raises=False)
    after, _ = charged(node.ledger())
    assert after >= ran_before_kill + witness.steps
    killed_indices = {int(i) for i in counter.read_text().split()}
    assert killed_indices.isdisjoint(witness.noise)  # the retry's noise is fresh


def test_a_hospital_whose_ledger_would_pass_its_epsilon_refuses_naming_the_ledger(tmp_path, medsyngan_cache,
                                                                                 monkeypatch):
    """The ledger, not the aggregator, decides when a hospital stops: a round past its ε is refused as such."""
    node = HospitalNode(tmp_path)
    ledger = FileLedger(node_identity(node.node_config, node.job))
    node.send(node.instruction(1, 0, b"first"))
    spent = ledger.read()
    spent["accountant"]["history"].append([0.5, 1.0, 50])  # as if much more had been spent before
    ledger.write(spent)
    reply = node.send(node.instruction(2, 1, b"second"))
    assert reply.has_error() and reply.error.code == p.REFUSAL_CODE
    assert "training stops here" in reply.error.reason and str(ledger.path) in reply.error.reason
