"""Flower ClientApp: one hospital. Thin: it unpacks messages and calls the plain modules.

Like ``cli``, this module is a composition root: it hands the evaluation layer's metric function to the hospital,
which itself does not depend on evaluation.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from medsyngan.errors import UserError
from medsyngan.privacy.secagg import SecAggAbort, SecAggClient
from medsyngan.federated import messages as msg
from medsyngan.federated import wire
from medsyngan.federated.client import HospitalRuntime, node_identity, persist, restore

app = ClientApp()
_runtime = HospitalRuntime()
log = logging.getLogger("medsyngan.federated")
USER_ERROR_CODE = 4001


def _answer_user_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A problem the hospital can name (bad data path, missing state) goes back as a one-line error reply, which
    the server logs and counts as a missing hospital, instead of a remote traceback."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (UserError, SecAggAbort) as exc:
            log.error("%s", exc)
            return Message(Error(code=USER_ERROR_CODE, reason=str(exc)), reply_to=message)

    return wrapped


def hospital_metrics(fake_u8: np.ndarray, holdout_u8: np.ndarray) -> Mapping[str, float]:
    """Random-feature FD and KID of the global generator against the hospital's held-out patients."""
    from medsyngan.metrics import evaluate_images

    return evaluate_images(fake_u8, holdout_u8, metrics=["fd", "kid"], kid_subset_size=min(100, len(holdout_u8)))


def _job(message: Message) -> dict:
    return dict(message.content[msg.KEY_CONFIG])


def _hospital_for(message: Message, context: Context):
    """(job, identity, hospital, cfg) of the node answering ``message``: every handler starts here."""
    job = _job(message)
    identity = node_identity(context.node_config, job)
    hospital, cfg = _runtime.hospital(identity, job)
    return job, identity, hospital, cfg


def _in_memory(context: Context) -> tuple[int, dict] | None:
    meta, arrays = context.state.get(msg.KEY_STATE_META), context.state.get(msg.KEY_STATE)
    if meta is None or arrays is None:
        return None
    return int(meta["round"]), msg.join_state(msg.record_to_state(arrays), str(meta["skeleton"]))


def _keep_in_memory(context: Context, round_: int, state: dict) -> None:
    tensors, skeleton = msg.split_state(state)
    context.state[msg.KEY_STATE] = msg.state_to_record(tensors)
    context.state[msg.KEY_STATE_META] = ConfigRecord({"round": round_, "skeleton": skeleton})


@app.query("hello")
@_answer_user_errors
def hello(message: Message, context: Context) -> Message:
    job, identity, hospital, _ = _hospital_for(message, context)
    hospital.check_ready()
    info = {"hospital": identity.hospital_id, "train_images": hospital.num_examples,
            "train_patients": hospital.num_patients, "holdout_images": len(hospital.holdout or [])}
    return msg.reply(message, RecordDict({msg.KEY_METRICS: msg.metrics_record(info)}))


def _secagg_client(context: Context, job: dict) -> SecAggClient:
    record = context.state.get("secagg")
    if record is None or int(record["round"]) != int(job["round"]):
        raise SecAggAbort(f"no secure-aggregation keys for round {job['round']} at this hospital")
    return SecAggClient.from_bytes(bytes(record["client"]), wire.secagg_config(job))


def _keep_secagg_client(context: Context, job: dict, client: SecAggClient) -> None:
    # The client's secrets stay in the hospital's own state between the stages of one round.
    context.state["secagg"] = ConfigRecord({"round": int(job["round"]), "client": client.to_bytes()})


def _secagg_reply(message: Message, record: dict) -> Message:
    return msg.reply(message, RecordDict({"secagg": ConfigRecord(record)}))


@app.query("secagg_advertise")
@_answer_user_errors
def secagg_advertise(message: Message, context: Context) -> Message:
    job = _job(message)
    identity = node_identity(context.node_config, job)
    client = SecAggClient(identity.hospital_id + 1, wire.secagg_config(job))
    _keep_secagg_client(context, job, client)
    return _secagg_reply(message, wire.advert_record(client.advertise()))


@app.query("secagg_share")
@_answer_user_errors
def secagg_share(message: Message, context: Context) -> Message:
    job = _job(message)
    client = _secagg_client(context, job)
    shares = client.share_keys(wire.read_adverts(job))
    _keep_secagg_client(context, job, client)
    return _secagg_reply(message, wire.shares_record(shares))


@app.query("secagg_unmask")
@_answer_user_errors
def secagg_unmask(message: Message, context: Context) -> Message:
    job = _job(message)
    client = _secagg_client(context, job)
    reveals = client.unmask(int(i) for i in job["survivors"])
    _keep_secagg_client(context, job, client)
    return _secagg_reply(message, wire.reveals_record(reveals))


@app.train()
@_answer_user_errors
def train(message: Message, context: Context) -> Message:
    job, identity, hospital, cfg = _hospital_for(message, context)
    secure = cfg.privacy.secagg
    client = _secagg_client(context, job) if secure else None
    restore(hospital, identity, int(job["resume_round"]), _in_memory(context))
    global_state = msg.record_to_state(message.content[msg.KEY_WEIGHTS])
    result = hospital.train_round(global_state, cfg.federated.local_steps)
    round_ = int(job["round"])
    masking = {}
    if client is not None:
        inbox = wire.read_inbox(job)
        masking = {"scales": np.asarray(job["secagg_scales"], np.float64), "ring_bits": int(job["secagg_ring_bits"]),
                   "masker": lambda ring_vector: client.masked_input(ring_vector, inbox)}
    encoded = wire.encode_update(result.update, result.num_examples, cfg.privacy, seed=cfg.run.seed,
                                 hospital=identity.hospital_id, round_=round_, **masking)
    if client is not None:
        _keep_secagg_client(context, job, client)
    payload = encoded.payload
    if cfg.privacy.encrypt:
        payload = wire.seal_update(payload, job, identity.hospital_id, round_, wire.model_hash(global_state),
                                   context.node_config.get("aggregator-public"))
    _keep_in_memory(context, round_, persist(hospital, identity, round_))
    metrics = {**result.metrics, **encoded.stats, "num_examples": result.num_examples, "weight": encoded.weight}
    content = RecordDict({msg.KEY_UPDATE: msg.update_record(payload), msg.KEY_METRICS: msg.metrics_record(metrics)})
    return msg.reply(message, content)


@app.evaluate()
@_answer_user_errors
def evaluate(message: Message, context: Context) -> Message:
    job, identity, hospital, cfg = _hospital_for(message, context)
    generator = msg.record_to_state(message.content[msg.KEY_WEIGHTS])
    scores = hospital.evaluate(generator, cfg.eval.num_samples, hospital_metrics)
    return msg.reply(message, RecordDict({msg.KEY_METRICS: msg.metrics_record(scores)}))
