"""Nothing in the clear: beside its sealed update a hospital says only its own privacy spend; its training
statistics stay with it under DP or secure aggregation and are sealed into the update otherwise; FedAvg weights
and the images counted come from the roster; metrics.jsonl holds only the allow-list of the threat model; a
truncated or wrong-length masked update counts as that hospital dropping out."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Message
from flwr.supercore.task_identity import TaskIdentity

from medsyngan.config import load_config
from medsyngan.errors import UserError
from medsyngan.federated import protocol as p
from medsyngan.federated.client_app import make_client_app
from medsyngan.federated.round_log import HOSPITAL_FIELDS, ROUND_FIELDS
from medsyngan.federated.server import RoundDriver
from medsyngan.rundir import RunDir
from medsyngan.workflows.federation import prepare_job, simulation_identity_key
from federation_settings import WITHOUT_DP
from test_federated_rounds import LoopbackGrid
from test_fixed_seed_weights import COMMON

PLAIN = COMMON + [*WITHOUT_DP, "federated.rounds=1", "federated.local_steps=1",
                  "federated.holdout_fraction=0", "federated.round_retries=0", "federated.eval_every=100"]
SECURE_DP = PLAIN + ["privacy.dp=true", "hospital.dp_required=true", "privacy.target_epsilon=20",
                     "hospital.max_epsilon=20", "privacy.mean_image_size=0", "federated.local_steps=2"]
SEALED = PLAIN + ["privacy.secagg=false", "hospital.secagg_required=false", "federated.quorum=2"]
UNSEALED_SECURE = PLAIN + ["privacy.encrypt=false", "hospital.encrypt_required=false", "federated.quorum=2"]
TRAINING_STATS = ("d_loss", "g_loss", "update_norm", "clamped", "images", "img_per_s", "train_seconds")


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


class Wire:
    """A relay that keeps every training reply as it crossed the network (and may rewrite it)."""

    def __init__(self, rewrite=None):
        self.replies: list[Message] = []
        self.rewrite = rewrite

    def __call__(self, reply: Message) -> Message:
        if reply.metadata.message_type == p.TRAIN and not reply.has_error():
            self.replies.append(reply)
            if self.rewrite is not None:
                self.rewrite(reply)
        return reply


def _run(tmp_path, overrides: list[str], wire: Wire, hospitals: int = 3) -> tuple[RoundDriver, RunDir]:
    cfg = load_config("federated-dcgan64", overrides)
    run_dir = RunDir(tmp_path / "run").create(cfg)
    logging.getLogger("medsyngan").propagate = True  # as before the run's log handler stopped it: caplog sees it
    driver = RoundDriver(cfg, run_dir, prepare_job(cfg, run_dir, resume=False, simulation=True), False,
                         simulation_identity_key(cfg, run_dir))
    driver.run(LoopbackGrid(make_client_app(lambda fake, holdout: {}), hospitals, wire))
    return driver, run_dir


def _round_rows(run_dir: RunDir) -> list[dict]:
    return [r for r in run_dir.read_metrics() if "hospital" in r]


def test_under_dp_and_secure_aggregation_only_the_hospitals_own_epsilon_leaves_it(tmp_path, medsyngan_cache):
    wire = Wire()
    driver, run_dir = _run(tmp_path, SECURE_DP, wire)
    assert len(wire.replies) == 3
    for reply in wire.replies:
        assert set(reply.content) == {"update", "report"}
        assert set(reply.content["report"]) == {"epsilon", "epsilon_add_remove", "delta", "patient_level"}
        assert set(reply.content["update"]) == {"payload"}  # one opaque, sealed byte string
    (row,) = _round_rows(run_dir)
    assert set(row) <= set(ROUND_FIELDS) and row["d_loss"] is None and row["relation"] == "replace-one"
    for hospital, entry in row["hospital"].items():
        assert set(entry) <= set(HOSPITAL_FIELDS)
        assert entry["weight"] == entry["train_images"] == driver.weights[int(hospital)]
        assert 0 < entry["epsilon"] <= 20 and entry["relation"] == "replace-one"
    # Images are counted from the plan (3 hospitals × 2 steps × 8), not from the realised Poisson batches.
    assert row["kimg"] == 3 * 2 * 8 / 1000


def test_medsyngan_privacy_prints_each_hospitals_own_epsilon_with_its_relation(tmp_path, medsyngan_cache,
                                                                              monkeypatch, capsys):
    from cli_run import run_cli

    _, run_dir = _run(tmp_path, SECURE_DP, Wire())
    (row,) = _round_rows(run_dir)
    code, out, _ = run_cli(monkeypatch, capsys, "privacy", "--run", str(run_dir.root))
    assert code == 0 and "from each hospital's own ledger" in out
    for hospital, entry in row["hospital"].items():
        line = next(x for x in out.splitlines() if f"hospital {hospital} " in x)
        assert f"{entry['epsilon']:.4f}" in line and "replace-one" in line and "patient" in line


def test_without_dp_or_secure_aggregation_statistics_travel_sealed_inside_the_update(tmp_path, medsyngan_cache):
    wire = Wire()
    _, run_dir = _run(tmp_path, SEALED, wire)
    for reply in wire.replies:
        assert set(reply.content) == {"update", "report"} and not reply.content["report"]
        assert b"d_loss" not in reply.content["update"]["payload"]  # sealed: the name is not readable on the wire
    (row,) = _round_rows(run_dir)
    assert row["d_loss"] is not None
    for entry in row["hospital"].values():
        assert {"d_loss", "update_norm", "train_seconds"} <= set(entry)


LEAKED = 31415.926  # a value no honest statistic of the tiny run takes, so its absence from the log means something


def test_a_hospital_sending_statistics_in_the_clear_is_refused_and_nothing_of_it_is_logged(
        tmp_path, medsyngan_cache, caplog):
    def leak(reply: Message) -> None:
        if reply.metadata.src_node_id == 102:
            reply.content["report"]["update_norm"] = LEAKED
    with caplog.at_level(logging.ERROR, logger="medsyngan.federated"):
        _, run_dir = _run(tmp_path, SEALED, Wire(leak))
    assert "reply of hospital 2 rejected" in caplog.text and "update_norm in the clear" in caplog.text
    (row,) = _round_rows(run_dir)
    assert row["hospitals_replied"] == [0, 1] and str(LEAKED) not in run_dir.metrics_path.read_text()


def _reshape(change):
    def rewrite(reply: Message) -> None:
        if reply.metadata.src_node_id == 102:
            update = reply.content["update"]
            reply.content["update"] = ConfigRecord({"payload": change(bytes(update["payload"]))})
    return rewrite


@pytest.mark.parametrize("change", [lambda b: b[: len(b) // 2], lambda b: b + b[:12], lambda b: b[:-1], lambda b: b""],
                         ids=["truncated", "longer", "one byte short", "empty"])
def test_a_wrong_length_masked_update_counts_as_that_hospital_dropping_out(tmp_path, medsyngan_cache, caplog, change):
    with caplog.at_level(logging.WARNING, logger="medsyngan.federated"):
        _, run_dir = _run(tmp_path, UNSEALED_SECURE, Wire(_reshape(change)))
    assert "reply of hospital 2 rejected" in caplog.text
    assert [r["hospitals_replied"] for r in _round_rows(run_dir)] == [[0, 1]]


def test_a_wrong_length_masked_update_below_the_threshold_fails_the_round_in_one_line(tmp_path, medsyngan_cache):
    with pytest.raises(UserError, match=r"^round 1 missed its quorum of 2 hospitals 1 time\(s\); no round completed$"):
        _run(tmp_path, UNSEALED_SECURE + ["privacy.secagg_threshold=1"], Wire(_reshape(lambda b: b[:5])))


def _stage_reply(message_type: str, change):
    def rewrite(reply: Message) -> None:
        if reply.metadata.src_node_id == 102 and reply.metadata.message_type == message_type:
            change(reply.content["secagg"])

    class Stage(Wire):
        def __call__(self, reply: Message) -> Message:
            if not reply.has_error():
                rewrite(reply)
            return reply

    return Stage()


@pytest.mark.parametrize(("message_type", "change", "replied", "logged"), [
    (p.SECAGG_ADVERTISE, lambda r: r.__setitem__("cipher_public", b"short"), [0, 1], "is not 32 bytes"),
    (p.SECAGG_ADVERTISE, lambda r: r.__setitem__("mask_public", bytes(32)), [0, 1], "not signed for run"),
    (p.SECAGG_SHARE, lambda r: r.__setitem__("to", [77] * len(r["to"])), [0, 1], "outside this round's key list"),
    (p.SECAGG_UNMASK, lambda r: r.__setitem__("kind", ["x"] * len(r["kind"])), [0, 1, 2], "neither 'b'"),
    (p.SECAGG_UNMASK, lambda r: r.__setitem__("kind", ["s"] * len(r["kind"])), [0, 1, 2],
     "does not fit the survivor list"),
], ids=["short key advert", "key advert changed after signing", "shares to a stranger", "unknown share kind", "mask-key shares of survivors"])
def test_a_malformed_secure_aggregation_reply_counts_that_hospital_out_of_the_stage(
        tmp_path, medsyngan_cache, caplog, message_type, change, replied, logged):
    """A hospital whose stage reply does not fit the round drops out of that stage; the round goes on with the
    threshold of the others (after masking, its update is still unmasked from the others' shares)."""
    with caplog.at_level(logging.ERROR, logger="medsyngan.federated"):
        _, run_dir = _run(tmp_path, UNSEALED_SECURE, _stage_reply(message_type, change))
    assert "reply of hospital 2 rejected" in caplog.text and logged in caplog.text
    assert [r["hospitals_replied"] for r in _round_rows(run_dir)] == [replied]
