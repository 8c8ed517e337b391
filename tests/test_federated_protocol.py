"""The federation's messages: every type survives Flower's wire format, and a record that lacks or mistypes a
field is refused with one line naming it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from medsyngan.federated import protocol as p
from medsyngan.federated.advert_signing import AdvertSignature
from medsyngan.privacy.secagg import KeyAdvert, SecAggConfig

TERMS = p.SecAggTerms.of(SecAggConfig(ids=(1, 2, 3), threshold=2, ring_bits=24, length=10, neighbours=0,
                                      context=b"run/4"), np.array([0.5, 0.25]))
JOB = p.Job(config="[run]\nseed = 1\n", run_id="r1", partition="/p.csv", state_dir="/s", aggregator_public=b"k" * 32,
            roster=b'{"hospitals":{}}', signing_keys="/keys")
SIGNED = AdvertSignature(b"spki", b"sig")


def _over_the_wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


@pytest.mark.parametrize("instruction", [
    p.Instruction(p.Job(config="x", run_id="r")),
    p.Instruction(JOB, p.RoundInstruction(4, 2, b"r" * 32, TERMS,
                                          adverts={1: KeyAdvert(b"c" * 32, b"m" * 32), 2: KeyAdvert(b"d" * 32, b"n" * 32)},
                                          signatures={1: SIGNED})),
    p.Instruction(JOB, p.RoundInstruction(4, 0, secagg=TERMS, inbox={2: b"ct2", 3: b"ct3"}),
                  {"G.w": torch.arange(6.0).reshape(2, 3)}),
    p.Instruction(JOB, p.RoundInstruction(4, 3, survivors=(1, 3))),
], ids=["hello", "share keys", "train", "unmask"])
def test_instructions_round_trip(instruction):
    back = p.Instruction.from_record(_over_the_wire(instruction.to_record()))
    assert (back.job, back.round) == (instruction.job, instruction.round)
    assert (back.weights is None) == (instruction.weights is None)
    for key, value in (instruction.weights or {}).items():
        assert torch.equal(back.weights[key], value)


@pytest.mark.parametrize("reply", [
    p.Hello(2, 120, 30, 12),
    p.TrainReply(b"sealed", {"epsilon": 0.5, "delta": 1e-5}),
    p.KeyAdvertReply(KeyAdvert(b"c" * 32, b"m" * 32), SIGNED),
    p.SharesReply({1: b"a", 3: b"b"}),
    p.RevealsReply({1: ("b", 2**500 + 7), 2: ("s", 5)}),
    p.EvaluationReply({"fd": 1.5, "holdout_images": 4.0}),
], ids=lambda reply: type(reply).__name__)
def test_replies_round_trip(reply):
    assert type(reply).from_record(_over_the_wire(reply.to_record())) == reply


def test_a_plain_update_travels_as_tensors():
    reply = p.TrainReply({"G.w": torch.ones(3)}, {}, {"d_loss": 1.0})
    back = p.TrainReply.from_record(_over_the_wire(reply.to_record()))
    assert torch.equal(back.payload["G.w"], torch.ones(3)) and back.stats == {"d_loss": 1.0}


def test_a_job_file_round_trips():
    assert p.Job.from_json(JOB.to_json()) == JOB


@pytest.mark.parametrize(("content", "message"), [
    (RecordDict({"round": ConfigRecord({"round": 1, "resume_round": 0})}), "malformed instruction: no 'job'"),
    (RecordDict({"job": ConfigRecord({"config": "x", "run_id": 7})}), "malformed job: run_id is int"),
    (RecordDict({"job": ConfigRecord({"config": "x", "run_id": "r"}), "round": ConfigRecord({"round": True,
                                                                                              "resume_round": 0})}),
     "malformed round instruction: round is bool"),
    (RecordDict({"job": ConfigRecord({"config": "x", "run_id": "r"}),
                 "round": ConfigRecord({"round": 1, "resume_round": 0, "inbox.from": [1, 2], "inbox.ciphertext": [b"a"]})}),
     "malformed round instruction: inbox.from and inbox.ciphertext differ in length"),
])
def test_a_malformed_instruction_is_one_line(content, message):
    with pytest.raises(p.MalformedMessage) as caught:
        p.Instruction.from_record(content)
    assert str(caught.value) == message


@pytest.mark.parametrize(("read", "content", "message"), [
    (p.Hello.from_record, RecordDict({"hello": ConfigRecord({"hospital": 1})}), "malformed hello: no 'train_images'"),
    (p.TrainReply.from_record, RecordDict({"update": ConfigRecord({"payload": b"x"})}),
     "malformed training reply: no 'report'"),
    (p.TrainReply.from_record, RecordDict({"update": ConfigRecord({"payload": "text"}),
                                           "report": MetricRecord({"epsilon": 1.0})}),
     "malformed training reply: payload is str"),
    (p.SharesReply.from_record, RecordDict({"secagg": ConfigRecord({"to": [1], "ciphertext": [b"a", b"b"]})}),
     "malformed key shares: to and ciphertext differ in length"),
    (p.RevealsReply.from_record, RecordDict({"secagg": ConfigRecord({"peer": [1], "kind": [2], "share": [b"x"]})}),
     "malformed unmasking shares: kind holds int values"),
    (p.EvaluationReply.from_record, RecordDict({}), "malformed evaluation reply: no 'metrics'"),
])
def test_a_malformed_reply_is_one_line(read, content, message):
    with pytest.raises(p.MalformedMessage) as caught:
        read(content)
    assert str(caught.value) == message


def test_a_stage_without_its_terms_is_refused():
    with pytest.raises(p.MalformedMessage, match="^round 4: the instruction carries no inbox$"):
        p.RoundInstruction(4, 0, secagg=TERMS).require("inbox")
    with pytest.raises(p.MalformedMessage, match="the instruction carries no weights"):
        p.Instruction(JOB).require_weights()
