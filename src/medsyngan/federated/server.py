"""The aggregator's round driver on Flower's Message API: roster, rounds (plain or secure), retries, evaluation.

We run our own loop over ``grid.send_and_receive`` rather than a stock Flower strategy because a reply is not
one float ArrayRecord: it may be quantized, masked for secure aggregation and encrypted, and the server must
checkpoint its own state (:mod:`~medsyngan.federated.server_state`) after every round so that a killed federation
resumes exactly. What is recorded about each round is :mod:`~medsyngan.federated.round_log`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.federated import advert_signing
from medsyngan.federated import protocol as p
from medsyngan.federated import round_log, update_codec
from medsyngan.federated.aggregation import ServerOptimizer, mean_of
from medsyngan.federated.client_dp import ClientLevelDP
from medsyngan.federated.hospital import shared_parts
from medsyngan.federated.hospital_keys import HospitalKeys
from medsyngan.federated.plan import participants
from medsyngan.federated.records import record_bytes
from medsyngan.federated.round_log import RoundOutcome, RoundTraffic
from medsyngan.federated.server_state import ServerState, load_server_state, round_name, save_server_state
from medsyngan.federated.transport import AggregatorTransport, tensors_hash
from medsyngan.models.progan import is_stage_key
from medsyngan.privacy.crypto import IntegrityError
from medsyngan.privacy.secagg import SecAggAbort, SecAggConfig, SecAggServer, threshold_for
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import checkpoint_key
from medsyngan.training.schedule import check_run_length
from medsyngan.training.step import GANTrainer

log = logging.getLogger("medsyngan.federated")
NODE_WAIT_S = 120.0
Reply = TypeVar("Reply")


def wait_for_nodes(eligible: Callable[[], list[int]], wanted: int, quorum: int, timeout: float) -> list[int]:
    """The ``eligible`` node ids once there are ``wanted``; after ``timeout`` settle for a quorum or fail clearly."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = eligible()
        if len(nodes) >= wanted:
            return nodes
        if time.monotonic() > deadline:
            if len(nodes) >= quorum:
                log.warning("only %d of %d hospitals connected; continuing with the quorum", len(nodes), wanted)
                return nodes
            raise UserError(
                f"only {len(nodes)} of {wanted} hospitals connected within {timeout:.0f}s (quorum "
                f"{quorum}); check that the SuperNodes are running and can reach the SuperLink"
            )
        time.sleep(0.2)


class RoundDriver:
    """One federation from the server's side: ``job`` is the static part of every instruction."""

    def __init__(self, cfg: Config, run_dir: RunDir, job: p.Job, resume: bool, identity_key: str | None = None,
                 hospital_keys: HospitalKeys | None = None):
        self.cfg = cfg
        self.hospital_keys = hospital_keys
        self.node_hospital: dict[int, int] = {}  # deployment: node id → hospital, from the node's authenticated key
        self.unmapped: set[int] = set()
        self.run_dir = run_dir
        self.checkpoint_key = checkpoint_key(cfg)  # a missing key file fails before any round
        update_codec.check_settings(cfg.privacy)
        check_run_length(cfg)
        self.transport = AggregatorTransport(cfg.privacy, job.run_id, identity_key)
        self.job = dataclasses.replace(job, aggregator_public=self.transport.identity_public)
        if cfg.privacy.secagg and job.roster is None:
            raise UserError("secure aggregation needs the federation's signed hospital roster, which hospitals check "
                            "each other's key adverts against; add the hospitals with `medsyngan pki add-hospital`")
        round_log.log_privacy_choices(cfg)
        self.state = load_server_state(run_dir, self.checkpoint_key) if resume else ServerState.initial(cfg)
        self.client_dp = ClientLevelDP(cfg, self.state) if cfg.privacy.client_dp else None
        f = cfg.federated
        self.optimizer = ServerOptimizer(f.strategy, GANTrainer(cfg, device="cpu").parameter_names(("G", "D")),
                                         f.server_lr, f.server_momentum)
        self.optimizer.load_state_dict(self.state.optimizer_state)
        self.roster: dict[int, int] = {}  # hospital → node id
        self.weights: dict[int, int] = {}  # hospital → training images
        self.refusals: dict[int, str] = {}  # hospital → why its policy refused the latest instruction it refused
        self.start = time.time()

    # ------------------------------------------------------------------ set-up
    def eligible_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes that may get work. In a deployment, only those whose key (the one Flower
        authenticated them with) the manifest names as one of this run's hospitals; in a simulation, all."""
        if self.hospital_keys is None:
            return sorted(grid.get_node_ids())
        self.node_hospital = {}
        for node in grid.get_nodes():
            hospital = self.hospital_keys.hospital_of(node.public_key)
            if hospital is not None and hospital < self.cfg.federated.hospitals:
                self.node_hospital[node.node_id] = hospital
            elif node.node_id not in self.unmapped:
                self.unmapped.add(node.node_id)
                log.warning("node %d: its key is no hospital of this run in the PKI manifest; it gets no work",
                            node.node_id)
        return sorted(self.node_hospital)

    def hello(self, grid: Grid) -> None:
        f = self.cfg.federated
        nodes = wait_for_nodes(lambda: self.eligible_nodes(grid), f.hospitals, f.quorum, NODE_WAIT_S)
        messages = [Message(p.Instruction(self.job).to_record(), dst_node_id=n, message_type=p.HELLO) for n in nodes]
        ready, errors = [], []
        for reply in grid.send_and_receive(messages, timeout=f.round_timeout_s):
            node = reply.metadata.src_node_id
            try:
                if reply.has_error():
                    raise p.MalformedMessage(reply.error.reason)
                ready.append((node, p.Hello.from_record(reply.content)))
            except p.MalformedMessage as exc:
                errors.append(f"node {node}: {exc}")
        for error in errors:
            log.error("hospital refused to start: %s", error)
        for node, hello in ready:
            registered = self.node_hospital.get(node, hello.hospital)
            if hello.hospital != registered:
                log.error("node %d claims hospital %d but its key is hospital %d's in the PKI manifest; it gets no "
                          "work", node, hello.hospital, registered)
                continue
            if hello.hospital in self.roster:
                raise UserError(f"two nodes both claim hospital {hello.hospital}; give each SuperNode its own hospital-id")
            if not 0 <= hello.hospital < f.hospitals:
                raise UserError(
                    f"a node claims hospital {hello.hospital} but federated.hospitals = {f.hospitals}; "
                    "hospital ids run from 0 to hospitals − 1"
                )
            self.roster[hello.hospital] = node
            self.weights[hello.hospital] = hello.train_images
        if len(self.roster) < f.quorum:
            reason = ("; ".join(e.split(": ", 1)[-1] for e in errors) if errors
                      else "no replies within federated.round_timeout_s")
            raise UserError(f"only {len(self.roster)} of {f.hospitals} hospitals ready (quorum {f.quorum}): {reason}")
        log.info("hospitals ready: %s", ", ".join(f"{h} ({self.weights[h]} images)" for h in sorted(self.roster)))

    # ------------------------------------------------------------------ rounds
    def run(self, grid: Grid) -> None:
        self.hello(grid)
        f = self.cfg.federated
        while self.state.round < f.rounds:
            round_ = self.state.round + 1
            for attempt in range(f.round_retries + 1):
                outcome = self.play_round(grid, round_)
                if outcome is not None:
                    break
                log.warning("round %d failed (attempt %d of %d)", round_, attempt + 1, f.round_retries + 1)
            else:
                saved = (f"the run stopped after round {self.state.round} with a saved checkpoint — fix the hospitals "
                         "and resume with --resume") if self.state.round else "no round completed"
                refused = "".join(f"; {reason}" for reason in sorted(set(self.refusals.values())))
                raise UserError(f"round {round_} missed its quorum of {f.quorum} hospitals "
                                f"{f.round_retries + 1} time(s){refused}; {saved}")
            self.finish_round(round_, outcome)
            if round_ % f.eval_every == 0 or round_ == f.rounds:
                self.evaluate(grid, round_)

    def participants(self, round_: int) -> list[int]:
        f = self.cfg.federated
        return participants(sorted(self.roster), f.fraction, f.quorum, self.cfg.run.seed, round_)

    def exchange(self, grid: Grid, round_: int, stage: str, message_type: str,
                 instructions: Mapping[int, p.RoundInstruction], traffic: RoundTraffic,
                 read: Callable[[int, Message], Reply], weights: Mapping[str, torch.Tensor] | None = None,
                 ) -> dict[int, Reply]:
        """Send each hospital its instruction; return the replies ``read`` accepts, by hospital; count bytes both
        ways.

        Replies are matched to hospitals through the message they answer: an error for a node the SuperLink
        declared offline comes from the SuperLink itself, not from the hospital's node. An error reply, or one that
        ``read`` refuses (malformed, failing authentication, undecodable), counts that hospital as missing."""
        messages = {}
        for hospital, instruction in instructions.items():
            content = p.Instruction(self.job, instruction, dict(weights) if weights is not None else None).to_record()
            messages[hospital] = Message(content, dst_node_id=self.roster[hospital], message_type=message_type,
                                         group_id=str(round_))
            traffic.count(traffic.sent, hospital, record_bytes(content))
        replies = list(grid.send_and_receive(list(messages.values()), timeout=self.cfg.federated.round_timeout_s))
        by_message = {m.metadata.message_id: h for h, m in messages.items()}
        good: dict[int, Reply] = {}
        for reply in replies:
            hospital = by_message.get(reply.metadata.reply_to_message_id)
            if hospital is None:
                continue
            if reply.has_error():
                if reply.error.code == p.REFUSAL_CODE:
                    log.error("round %d (%s): %s", round_, stage, reply.error.reason)
                    self.refusals[hospital] = reply.error.reason
                else:
                    log.warning("round %d (%s): hospital %d: %s", round_, stage, hospital, reply.error.reason)
                continue
            traffic.count(traffic.received, hospital, record_bytes(reply.content))
            try:
                good[hospital] = read(hospital, reply)
            except (p.MalformedMessage, IntegrityError, ValueError) as exc:
                log.error("round %d (%s): reply of hospital %d rejected: %s", round_, stage, hospital, exc)
        missing = sorted(set(messages) - set(good))
        if missing:
            log.warning("round %d (%s): no usable reply from hospital(s) %s", round_, stage, missing)
        return dict(sorted(good.items()))

    def instructions(self, round_: int, hospitals: Iterable[int], **terms: Any) -> dict[int, p.RoundInstruction]:
        """Each hospital's instruction for a stage of ``round_`` (it resumes from its own last aggregated round); a
        term given as a function is evaluated per hospital."""
        stage = self.state.stage(self.cfg)
        growth = None if stage is None else p.Growth(self.state.schedule_images, *stage)
        return {h: p.RoundInstruction(round_, self.state.last_round.get(h, 0), self.transport.round_public(round_),
                                      growth=growth, **{k: v(h) if callable(v) else v for k, v in terms.items()})
                for h in hospitals}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors a round averages: the shared networks' float weights and statistics. Integer counters
        (BatchNorm's num_batches_tracked) stay out: averaging them means nothing, and their Δ of K steps per round
        would dominate an update's norm and so its clipping and quantization scale. A growing model's stage is the
        server's to set (the round instruction carries it), not an average."""
        return {k: v for k, v in self.state.global_state.items()
                if k.split(".", 1)[0] in shared_parts(self.cfg) and v.is_floating_point() and not is_stage_key(k)}

    def play_round(self, grid: Grid, round_: int) -> RoundOutcome | None:
        """One round's exchange; None when fewer than the quorum of usable updates came back."""
        chosen = self.participants(round_)
        traffic = RoundTraffic()
        try:
            if self.cfg.privacy.secagg:
                outcome = self.secure_round(grid, round_, chosen, traffic)
            else:
                outcome = self.plain_round(grid, round_, chosen, traffic)
        except SecAggAbort as exc:
            log.warning("round %d: secure aggregation abandoned: %s", round_, exc)
            outcome = None
        finally:
            self.transport.close_round(round_)
        if outcome is None or len(outcome.reports) < self.cfg.federated.quorum:
            return None
        outcome.traffic = traffic
        return outcome

    def _train_reply(self, round_: int, global_hash: bytes, hospital: int,
                     message: Message) -> tuple[p.TrainReply, bytes | dict[str, torch.Tensor]]:
        """A training reply and its update as the hospital encoded it (decrypted when updates are encrypted)."""
        reply = p.TrainReply.from_record(message.content)
        return reply, self.transport.open(reply.payload, hospital, round_, global_hash)

    def roster_weight(self, hospital: int) -> int:
        """A hospital's FedAvg weight: from the training images it declared at registration, fixed for the run."""
        return update_codec.hospital_weight(self.cfg.privacy, self.weights[hospital])

    def plain_round(self, grid: Grid, round_: int, chosen: list[int], traffic: RoundTraffic) -> RoundOutcome:
        shared = self.shared_state()
        global_hash = tensors_hash(shared)

        def read(hospital: int, message: Message) -> tuple[p.TrainReply, dict[str, np.ndarray], dict[str, float]]:
            reply, payload = self._train_reply(round_, global_hash, hospital, message)
            stats = reply.stats or {}
            if isinstance(payload, bytes):
                payload, stats = update_codec.split_stats(payload)
            return reply, update_codec.decode_update(payload, self.cfg.privacy), stats

        replies = self.exchange(grid, round_, "train", p.TRAIN, self.instructions(round_, chosen), traffic, read,
                                shared)
        outcome = RoundOutcome()
        for hospital, (reply, arrays, stats) in replies.items():
            outcome.add(hospital, reply.report, {k: torch.as_tensor(np.array(v)) for k, v in arrays.items()},
                        self.roster_weight(hospital), stats)
        return outcome

    def secure_round(self, grid: Grid, round_: int, chosen: list[int], traffic: RoundTraffic) -> RoundOutcome:
        """Secure aggregation over the Message API: advertise keys → share keys → masked (and sealed) input from
        training → unmask. The server only ever holds the sum of the survivors' integer updates."""
        privacy = self.cfg.privacy
        shared = self.shared_state()
        arrays = {k: v.numpy() for k, v in shared.items()}
        weights = {h: self.roster_weight(h) for h in chosen}
        ring_bits = update_codec.secagg_ring_bits(privacy.quantize_bits, sum(weights.values()))
        previous = self.state.previous_mean
        t = self.cfg.train
        adam_bound = self.cfg.federated.local_steps * t.d_steps_per_g * max(t.lr_g, t.lr_d)
        scales = update_codec.shared_scales(
            privacy, arrays, None if previous is None else {k: v.numpy() for k, v in previous.items()}, adam_bound)
        ids = tuple(h + 1 for h in chosen)  # SecAgg ids start at 1 (0 is Shamir's secret point)
        holders = len(ids) if not privacy.secagg_neighbours else min(len(ids), privacy.secagg_neighbours + 1)
        config = SecAggConfig(ids=ids, threshold=threshold_for(privacy.secagg_threshold, holders), ring_bits=ring_bits,
                              length=sum(v.size for v in arrays.values()), neighbours=privacy.secagg_neighbours,
                              context=f"{self.job.run_id}/{round_}".encode())
        terms = p.SecAggTerms.of(config, scales)
        server = SecAggServer(config)
        global_hash = tensors_hash(shared)

        def masked_input(hospital: int, message: Message) -> tuple[p.TrainReply, np.ndarray]:
            reply, payload = self._train_reply(round_, global_hash, hospital, message)
            if not isinstance(payload, bytes):
                raise p.MalformedMessage("a masked update must travel as bytes")
            return reply, update_codec.read_masked(payload, ring_bits, config.length)

        roster = advert_signing.SignedRoster.from_bytes(self.job.roster or b"")

        def signed_advert(hospital: int, message: Message) -> p.KeyAdvertReply:
            """An advert its hospital signed for this round: any other would make every peer refuse the round."""
            reply = p.KeyAdvertReply.from_record(message.content)
            reason = advert_signing.advert_refusal(roster, self.job.run_id, round_, hospital, reply.advert,
                                                   reply.signature)
            if reason is not None:
                raise ValueError(reason)
            return reply

        adverts = self.exchange(grid, round_, "advertise keys", p.SECAGG_ADVERTISE,
                                self.instructions(round_, chosen, secagg=terms), traffic, signed_advert)
        listed = server.collect_adverts({h + 1: reply.advert for h, reply in adverts.items()})
        signatures = {h + 1: reply.signature for h, reply in adverts.items()}
        shares = self.exchange(grid, round_, "share keys", p.SECAGG_SHARE,
                               self.instructions(round_, adverts, secagg=terms, adverts=listed,
                                                 signatures=signatures), traffic,
                               lambda h, m: _addressed(p.SharesReply.from_record(m.content).shares,
                                                       set(listed) - {h + 1}))
        inboxes = server.route_shares({h + 1: out for h, out in shares.items()})
        trained = self.exchange(grid, round_, "train", p.TRAIN,
                                self.instructions(round_, shares, secagg=terms, inbox=lambda h: inboxes[h + 1]),
                                traffic, masked_input, shared)
        survivors = server.collect_masked({h + 1: masked for h, (_, masked) in trained.items()})
        reveals = self.exchange(grid, round_, "unmask", p.SECAGG_UNMASK,
                                self.instructions(round_, [h - 1 for h in sorted(survivors)], secagg=terms,
                                                  survivors=tuple(sorted(survivors))), traffic,
                                lambda _, m: _consistent(p.RevealsReply.from_record(m.content).reveals,
                                                         server.shared, survivors))
        total = server.unmask({h + 1: r for h, r in reveals.items()}, binding=global_hash)
        summed = update_codec.dequantize_sum(total, ring_bits, arrays, scales)
        outcome = RoundOutcome()
        outcome.total = {k: torch.as_tensor(np.array(v, np.float64)) for k, v in summed.items()}
        outcome.weight = float(sum(weights[h - 1] for h in survivors))
        outcome.reports = {h - 1: trained[h - 1][0].report for h in sorted(survivors)}
        return outcome

    def finish_round(self, round_: int, outcome: RoundOutcome) -> None:
        # Counted, not reported: K generator steps of d_steps_per_g batches per hospital. Under DP this is the
        # expected count, so that the realised Poisson batch sizes are never released.
        t = self.cfg.train
        images = len(outcome.reports) * self.cfg.federated.local_steps * t.d_steps_per_g * t.batch_size
        if self.client_dp is not None:
            mean = self.client_dp.noisy_mean(outcome.total, len(self.participants(round_)), round_)
        else:
            mean = mean_of(outcome.total, outcome.weight)
        self.state.previous_mean = {k: v.to(torch.float32) for k, v in mean.items()}
        shared = {k: v for k, v in self.state.global_state.items() if k in mean}
        self.state.global_state.update(self.optimizer.step(shared, mean))
        self.state.round = round_
        self.state.images_seen += images
        for hospital in outcome.reports:
            self.state.last_round[hospital] = round_
        self.state.update_ema(images, self.cfg.train.ema_kimg)
        self.state.advance_growth(self.cfg)
        self.state.optimizer_state = self.optimizer.state_dict()
        save_server_state(self.run_dir, self.state, self.cfg, self.checkpoint_key)
        row = round_log.round_row(round_, outcome, self.state.images_seen, time.time() - self.start,
                                  {h: (self.weights[h], self.roster_weight(h)) for h in outcome.reports},
                                  with_stats=not (self.cfg.privacy.dp or self.cfg.privacy.secagg))
        if (stage := self.state.stage(self.cfg)) is not None:
            row["stage_resolution"], row["alpha"] = stage
        if self.client_dp is not None:
            row.update(self.client_dp.metrics())
        self.run_dir.append_metrics(row)
        round_log.log_round(row, self.cfg.federated.rounds)

    def evaluate(self, grid: Grid, round_: int) -> None:
        """The server's sample grid from fixed latents, then hospitals score the global generator on their
        held-out patients; only the scalars come back."""
        generator = self.state.generator_state()
        round_log.save_round_grid(self.cfg, generator, self.run_dir.samples / f"{round_name(round_)}.png")
        messages = [Message(p.Instruction(self.job, weights=generator).to_record(), dst_node_id=node,
                            message_type=p.EVALUATE, group_id=str(round_)) for _, node in sorted(self.roster.items())]
        results = []
        for reply in grid.send_and_receive(messages, timeout=self.cfg.federated.round_timeout_s):
            try:
                if reply.has_error():
                    raise p.MalformedMessage(reply.error.reason)
                results.append(p.EvaluationReply.from_record(reply.content))
            except p.MalformedMessage as exc:
                log.warning("evaluation round %d: node %d: %s", round_, reply.metadata.src_node_id, exc)
        row = round_log.evaluation_row(round_, results)
        if row is not None:
            self.run_dir.append_metrics(row)


def _addressed(shares: dict[int, bytes], peers: set[int]) -> dict[int, bytes]:
    """A hospital's key shares, when addressed only to the other hospitals of the key list."""
    if not set(shares) <= peers:
        raise ValueError(f"key shares addressed to {sorted(set(shares) - peers)}, outside this round's key list")
    return shares


def _consistent(reveals: dict[int, tuple[str, int]], shared: frozenset[int],
                survivors: frozenset[int]) -> dict[int, tuple[str, int]]:
    """A hospital's revealed shares, when each is a self-mask share of a survivor or a mask-key share of a
    hospital that shared keys and dropped out; anything else counts that hospital out of the unmasking."""
    for peer, (kind, _) in reveals.items():
        if peer not in shared or (kind == "b") != (peer in survivors):
            raise ValueError(f"a {kind!r}-share of hospital {peer - 1} does not fit the survivor list")
    return reveals
