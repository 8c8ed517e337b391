"""The Flower ClientApp of a hospital, built by :func:`make_client_app`. Thin: it reads typed messages
(:mod:`~medsyngan.federated.protocol`) and calls the plain modules.

The evaluation function is injected, so that this layer does not depend on the metrics layer above it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from medsyngan.errors import UserError
from medsyngan.federated import advert_signing
from medsyngan.federated import protocol as p
from medsyngan.federated import update_codec
from medsyngan.federated.client import (HospitalRuntime, NodeIdentity, advance_pin, cached_reply, check_pin,
                                        instruction_digest, keep_reply, node_identity, persist, restore)
from medsyngan.federated.app_signing import load_federation_public
from medsyngan.federated.policy import PolicyRefusal
from medsyngan.privacy.accounting import BudgetExceeded
from medsyngan.federated.hospital import EvaluateFn, Hospital
from medsyngan.federated.records import join_state, record_to_state, split_state, state_to_record
from medsyngan.federated.transport import seal_update, tensors_hash
from medsyngan.privacy.secagg import SecAggAbort, SecAggClient

log = logging.getLogger("medsyngan.federated")
USER_ERROR_CODE = 4001

# The hospital's own records in Flower's context.state: its latest round state, and its secure-aggregation
# secrets between the stages of one round.
STATE_TENSORS = "hospital_state"
STATE_META = "hospital_state_meta"
SECAGG_STATE = "secagg"


def _answer_user_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A problem the hospital can name (bad data path, missing state, a malformed instruction) goes back as a
    one-line error reply, which the server logs and counts as a missing hospital, instead of a remote traceback;
    a refusal by the hospital's policy or its ledger (its ε spent) carries its own code, so that the server
    counts it as a refusal."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (UserError, SecAggAbort, p.MalformedMessage) as exc:
            log.error("%s", exc)
            code = p.REFUSAL_CODE if isinstance(exc, (PolicyRefusal, BudgetExceeded)) else USER_ERROR_CODE
            return Message(Error(code=code, reason=str(exc)), reply_to=message)

    return wrapped


def _in_memory(context: Context) -> tuple[int, dict] | None:
    meta, arrays = context.state.get(STATE_META), context.state.get(STATE_TENSORS)
    if meta is None or arrays is None:
        return None
    return int(meta["round"]), join_state(record_to_state(arrays), str(meta["skeleton"]))


def _keep_in_memory(context: Context, round_: int, state: dict) -> None:
    tensors, skeleton = split_state(state)
    context.state[STATE_TENSORS] = state_to_record(tensors)
    context.state[STATE_META] = ConfigRecord({"round": round_, "skeleton": skeleton})


T = TypeVar("T")


def _secagg_client(context: Context, round_: p.RoundInstruction) -> SecAggClient:
    record = context.state.get(SECAGG_STATE)
    if record is None or int(record["round"]) != round_.round:
        raise SecAggAbort(f"no secure-aggregation keys for round {round_.round} at this hospital")
    return SecAggClient.from_bytes(bytes(record["client"]), round_.require("secagg").secagg_config())


def _keep_secagg_client(context: Context, round_: p.RoundInstruction, client: SecAggClient) -> None:
    context.state[SECAGG_STATE] = ConfigRecord({"round": round_.round, "client": client.to_bytes()})


def _secagg_step(context: Context, round_: p.RoundInstruction, step: Callable[[SecAggClient], T]) -> T:
    """One stage of the hospital's secure-aggregation client, its secrets kept in its own state in between."""
    client = _secagg_client(context, round_)
    result = step(client)
    _keep_secagg_client(context, round_, client)
    return result


def _required(identity: NodeIdentity) -> NodeIdentity:
    """A node that can take part in secure aggregation: it has a key to sign its adverts with and the federation
    key to check its peers' against."""
    if identity.signing_key is None or identity.federation_public is None:
        raise UserError(f"hospital {identity.hospital_id} takes part in secure aggregation but has no auth-key and "
                        "federation-public to sign and check key adverts with; start it with `medsyngan hospital start`")
    return identity


def _roster(job: p.Job) -> advert_signing.SignedRoster:
    if job.roster is None:
        raise PolicyRefusal("the instruction carries no signed hospital roster, so no peer's key advert can be "
                            "checked; the hospital shares nothing")
    try:
        return advert_signing.SignedRoster.from_bytes(job.roster)
    except (ValueError, TypeError) as exc:
        raise PolicyRefusal(f"the hospital roster of the instruction is malformed ({exc}); the hospital shares "
                            "nothing") from None


def make_client_app(evaluate_fn: EvaluateFn) -> ClientApp:
    """A hospital's ClientApp; ``evaluate_fn`` scores generated images against its held-out ones."""
    app = ClientApp()
    runtime = HospitalRuntime()

    def hospital_for(instruction: p.Instruction, context: Context) -> tuple[NodeIdentity, Hospital]:
        """This node's hospital, once its policy has accepted the instruction (PolicyRefusal otherwise)."""
        identity = node_identity(context.node_config, instruction.job)
        round_ = instruction.round.round if instruction.round is not None else None
        return identity, runtime.hospital(identity, instruction.job, round_)

    @app.query("hello")
    @_answer_user_errors
    def hello(message: Message, context: Context) -> Message:
        identity, hospital = hospital_for(p.Instruction.from_record(message.content), context)
        hospital.check_ready()
        return p.reply(message, p.Hello(identity.hospital_id, hospital.num_examples, hospital.num_patients,
                                        len(hospital.holdout or [])))

    @app.query("secagg_advertise")
    @_answer_user_errors
    def secagg_advertise(message: Message, context: Context) -> Message:
        instruction = p.Instruction.from_record(message.content)
        round_ = instruction.require_round()
        identity, _ = hospital_for(instruction, context)
        client = SecAggClient(identity.hospital_id + 1, round_.require("secagg").secagg_config())
        advert = client.advertise()
        signature = advert_signing.sign_advert(advert_signing.load_hospital_key(_required(identity).signing_key),
                                               instruction.job.run_id, round_.round, identity.hospital_id, advert)
        _keep_secagg_client(context, round_, client)
        return p.reply(message, p.KeyAdvertReply(advert, signature))

    @app.query("secagg_share")
    @_answer_user_errors
    def secagg_share(message: Message, context: Context) -> Message:
        instruction = p.Instruction.from_record(message.content)
        round_ = instruction.require_round()
        identity = _required(node_identity(context.node_config, instruction.job))
        adverts = round_.require("adverts")
        # Before any share leaves: every advert must be its hospital's own, for this run and round.
        advert_signing.check_adverts(
            _roster(instruction.job), load_federation_public(identity.federation_public), instruction.job.run_id,
            round_.round, {u - 1: a for u, a in adverts.items()},
            {u - 1: s for u, s in (round_.signatures or {}).items()}, identity.hospital_id)
        shares = _secagg_step(context, round_, lambda client: client.share_keys(adverts))
        return p.reply(message, p.SharesReply(shares))

    @app.query("secagg_unmask")
    @_answer_user_errors
    def secagg_unmask(message: Message, context: Context) -> Message:
        round_ = p.Instruction.from_record(message.content).require_round()
        reveals = _secagg_step(context, round_, lambda client: client.unmask(round_.require("survivors")))
        return p.reply(message, p.RevealsReply(reveals))

    @app.train()
    @_answer_user_errors
    def train(message: Message, context: Context) -> Message:
        instruction = p.Instruction.from_record(message.content)
        round_, global_state = instruction.require_round(), instruction.require_weights()
        identity, hospital = hospital_for(instruction, context)
        digest = instruction_digest(instruction)
        kept = cached_reply(identity, digest)
        if kept is not None:  # an exact repeat: the same reply, nothing computed, nothing charged
            return p.reply(message, kept)
        cfg = hospital.cfg
        pin = check_pin(identity, cfg, round_.round)
        client = _secagg_client(context, round_) if cfg.privacy.secagg else None
        restore(hospital, identity, round_.resume_round, _in_memory(context))
        growth = round_.growth
        result = hospital.train_round(global_state, cfg.federated.local_steps,
                                      None if growth is None else (growth.images, growth.resolution, growth.alpha))
        masking, model_hash = {}, tensors_hash(global_state)
        if client is not None:
            inbox, terms = round_.require("inbox"), round_.require("secagg")
            masking = {"scales": terms.scale_array, "ring_bits": terms.ring_bits,
                       "masker": lambda ring_vector: client.masked_input(ring_vector, inbox, model_hash)}
        encoded = update_codec.encode_update(result.update, result.num_examples, cfg.privacy, seed=cfg.run.seed,
                                             hospital=identity.hospital_id, round_=round_.round, **masking)
        if client is not None:
            _keep_secagg_client(context, round_, client)
        payload, stats = encoded.payload, update_codec.training_stats(cfg.privacy, result.metrics, encoded.stats)
        if isinstance(payload, bytes) and not cfg.privacy.secagg:
            payload, stats = update_codec.attach_stats(payload, stats or {}), None
        if cfg.privacy.encrypt:
            payload = seal_update(payload, instruction.job, round_, identity.hospital_id, model_hash,
                                  identity.aggregator_public)
        _keep_in_memory(context, round_.round, persist(hospital, identity, round_.round))
        advance_pin(identity, pin, round_.round)
        report = {k: float(result.metrics[k]) for k in p.PUBLIC_REPORT if k in result.metrics}
        answer = p.TrainReply(payload, report, stats)
        keep_reply(identity, digest, answer)
        return p.reply(message, answer)

    @app.evaluate()
    @_answer_user_errors
    def evaluate(message: Message, context: Context) -> Message:
        instruction = p.Instruction.from_record(message.content)
        _, hospital = hospital_for(instruction, context)
        scores = hospital.evaluate(instruction.require_weights(), hospital.cfg.eval.num_samples, evaluate_fn)
        return p.reply(message, p.EvaluationReply(scores))

    return app
