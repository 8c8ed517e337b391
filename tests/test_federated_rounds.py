"""The aggregator's round driver and the hospitals' ClientApp talking through Flower messages in one process:
the same protocol as on the Simulation and Deployment Engines, without Ray or a SuperLink in between."""

from __future__ import annotations

import logging
from collections.abc import Callable
from uuid import uuid4

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.federated import protocol as p
from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.server import RoundDriver
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import load_checkpoint
from medsyngan.workflows.federation import prepare_job, simulation_identity_key
from federation_settings import WITHOUT_DP
from test_fixed_seed_weights import COMMON, FEDERATED, assert_matches, fingerprint

# The configuration of the recorded federated run in test_fixed_seed_weights.py.
RECORDED = COMMON + [*WITHOUT_DP, "federated.rounds=2", "federated.local_steps=2", "federated.eval_every=2",
                     "federated.holdout_fraction=0", "train.batch_size=4"]


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    """The identity Flower gives the process that runs a ServerApp (instructions are stamped with it)."""
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


class LoopbackGrid:
    """Delivers each message to a ClientApp in this process, one Flower Context per node as the Simulation Engine
    keeps them; ``tamper`` may rewrite a reply on its way back."""

    def __init__(self, app, hospitals: int, tamper: Callable[[Message], Message] | None = None):
        self.app, self.tamper = app, tamper
        self.contexts = {100 + k: Context(run_id=1, node_id=100 + k, state=RecordDict(), run_config={},
                                          node_config={"partition-id": k, "num-partitions": hospitals})
                         for k in range(hospitals)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's grids do when they push
            reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            replies.append(self.tamper(reply) if self.tamper else reply)
        return replies


def _federation(tmp_path, overrides: list[str]) -> tuple[RoundDriver, RunDir]:
    cfg = load_config("federated-dcgan64", overrides)
    run_dir = RunDir(tmp_path / "run").create(cfg)
    job = prepare_job(cfg, run_dir, resume=False, simulation=True)
    return RoundDriver(cfg, run_dir, job, False, simulation_identity_key(cfg, run_dir)), run_dir


def _no_metrics(fake, holdout):
    return {}


def test_secure_encrypted_rounds_in_one_process_give_the_recorded_weights(tmp_path, medsyngan_cache):
    """Secure aggregation, 8-bit updates and AES-GCM through every stage's messages, as in the recorded run."""
    driver, run_dir = _federation(tmp_path, RECORDED)
    driver.run(LoopbackGrid(make_client_app(_no_metrics), 3))
    assert_matches(fingerprint(load_checkpoint(run_dir.root).tensors), FEDERATED)
    rows = [r for r in run_dir.read_metrics() if "hospital" in r]
    assert [r["hospitals_replied"] for r in rows] == [[0, 1, 2], [0, 1, 2]]


TINY = COMMON + ["privacy.dp=false", "privacy.secagg=false", "hospital.dp_required=false",
                 "hospital.secagg_required=false", "federated.rounds=1", "federated.local_steps=1",
                 "federated.holdout_fraction=0", "federated.quorum=2", "federated.round_retries=0"]


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _corrupt(hospital_node: int, change: Callable[[RecordDict], None]) -> Callable[[Message], Message]:
    def tamper(reply: Message) -> Message:
        if reply.metadata.src_node_id == hospital_node and reply.metadata.message_type == p.TRAIN:
            change(reply.content)
        return reply

    return tamper


@pytest.mark.parametrize(("change", "logged"), [
    (lambda content: content.pop("report"), "malformed training reply: no 'report'"),
    (lambda content: content.__setitem__("report", MetricRecord({"update_norm": 3.0})),
     "its report holds update_norm in the clear, which is no public field"),
    (lambda content: content.__setitem__("stats", MetricRecord({"d_loss": 1.0})),
     "it sends statistics in the clear beside an encoded update"),
    (lambda content: content["update"].__setitem__("payload", _flip_last(content["update"]["payload"])),
     "failed authentication"),
], ids=["no report", "private field in the report", "statistics beside the update", "altered ciphertext"])
def test_a_malformed_reply_counts_that_hospital_out_of_the_round(tmp_path, medsyngan_cache, caplog, change, logged):
    driver, run_dir = _federation(tmp_path, TINY)
    with caplog.at_level(logging.ERROR, logger="medsyngan.federated"):
        driver.run(LoopbackGrid(make_client_app(_no_metrics), 3, _corrupt(102, change)))
    assert logged in caplog.text and "hospital 2" in caplog.text
    assert [r["hospitals_replied"] for r in run_dir.read_metrics() if "hospital" in r] == [[0, 1]]


def test_a_round_without_its_quorum_stops_with_one_line(tmp_path, medsyngan_cache):
    driver, _ = _federation(tmp_path, TINY + ["federated.quorum=3"])
    broken = _corrupt(101, lambda content: content.pop("update"))
    with pytest.raises(UserError, match=r"^round 1 missed its quorum of 3 hospitals 1 time\(s\); no round completed$"):
        driver.run(LoopbackGrid(make_client_app(_no_metrics), 3, broken))


def test_a_hospital_answers_a_malformed_instruction_with_an_error_reply(tmp_path, medsyngan_cache):
    app = make_client_app(_no_metrics)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    message = Message(RecordDict({"round": p.RoundInstruction(1, 0).to_record()}), dst_node_id=7,
                      message_type=p.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    reply = app(message, context)
    assert reply.has_error() and reply.error.reason == "malformed instruction: no 'job'"


def test_client_level_dp_noises_secure_sums_and_its_accountant_survives_a_resume(tmp_path, medsyngan_cache):
    overrides = TINY + ["privacy.secagg=true", "privacy.client_dp=true", "privacy.client_clip=0.5"]
    driver, run_dir = _federation(tmp_path, overrides)
    driver.run(LoopbackGrid(make_client_app(_no_metrics), 3))
    first = load_checkpoint(run_dir.root).meta["client_dp_accountant"]
    cfg = load_config("federated-dcgan64", overrides + ["federated.rounds=2"])
    resumed = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=True, simulation=True), True,
                          simulation_identity_key(cfg, run_dir))
    resumed.run(LoopbackGrid(make_client_app(_no_metrics), 3))
    rows = [r for r in run_dir.read_metrics() if "hospital" in r]
    assert [r["round"] for r in rows] == [1, 2] and 0 < rows[0]["client_epsilon"] < rows[1]["client_epsilon"]
    # Equal weights under client-level DP: each hospital's influence is bounded by the clip alone.
    assert all(h["weight"] == 1.0 for r in rows for h in r["hospital"].values())
    assert load_checkpoint(run_dir.root).meta["client_dp_accountant"] != first
