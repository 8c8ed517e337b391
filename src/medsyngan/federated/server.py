"""The aggregator's round loop on Flower's Message API (used by the thin ServerApp in simulation and deployment).

We run our own loop over ``grid.send_and_receive`` rather than a stock Flower strategy because a reply is not
one float ArrayRecord: it may be quantized, masked for secure aggregation and encrypted, and the server must
checkpoint its own state (global networks, optimizer moments, which round each hospital last completed) after
every round so that a killed federation resumes exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from flwr.serverapp import Grid

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.federated import messages as msg
from medsyngan.federated import wire
from medsyngan.federated.aggregation import ServerOptimizer, accumulate, mean_of
from medsyngan.federated.hospital import shared_parts
from medsyngan.federated.plan import participants
from medsyngan.privacy.crypto import IntegrityError
from medsyngan.privacy.secagg import SecAggAbort, SecAggConfig, SecAggServer, threshold_for
from medsyngan.rundir import RunDir
from medsyngan.training.checkpoint import checkpoint_key, load_checkpoint, save_checkpoint_files
from medsyngan.training.generate import fixed_latents, save_sample_grid
from medsyngan.training.pretrained import pretrained_state
from medsyngan.training.step import GANTrainer

log = logging.getLogger("medsyngan.federated")
NODE_WAIT_S = 120.0


@dataclass
class ServerState:
    """Everything the aggregator needs to continue after a crash."""

    round: int
    global_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)
    last_round: dict[int, int] = field(default_factory=dict)  # hospital → last round whose update was aggregated
    images_seen: int = 0
    client_dp: dict[str, Any] | None = None  # DP-FedAvg accountant state and the server's secret noise seed
    previous_mean: dict[str, torch.Tensor] | None = None  # last round's mean update: sets SecAgg's shared scales

    @classmethod
    def initial(cls, cfg: Config) -> "ServerState":
        """Global networks initialised exactly as a centralized run with the same seed would be."""
        trainer = GANTrainer(cfg, device="cpu")
        if cfg.train.init_from:
            trainer.load_model_state(pretrained_state(cfg))
        state = trainer.model_state(("G", "D"))
        ema = {k.replace("G.", "G_ema.", 1): v.clone() for k, v in state.items() if k.startswith("G.")}
        return cls(round=0, global_state=state, ema_state=ema if cfg.train.ema_kimg > 0 else None)


@dataclass
class RoundTraffic:
    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """What a round produced: Σ w_k Δ_k over the accepted hospitals, Σ w_k, and their metrics."""

    total: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    traffic: RoundTraffic = field(default_factory=RoundTraffic)

    def add(self, hospital: int, metrics: dict[str, float], update: Mapping[str, torch.Tensor], weight: float) -> None:
        accumulate(self.total, update, weight)
        self.weight += weight
        self.metrics[hospital] = metrics


def round_name(round_: int) -> str:
    return f"round-{round_:05d}"


def save_server_state(run_dir: RunDir, state: ServerState, cfg: Config, key: bytes | None = None) -> Path:
    """The round's checkpoint in the training checkpoint format, so `generate` and `evaluate` read it as they read
    a centralized run; the server optimizer's moments ride in the training-state file; sealed with ``key``."""
    tensors = dict(state.global_state)
    if state.ema_state is not None:
        tensors.update(state.ema_state)
    meta = {
        "arch": cfg.model.arch,
        "resolution": cfg.model.resolution,
        "z_dim": cfg.model.z_dim,
        "parts": sorted({k.split(".", 1)[0] for k in tensors}),
        "config_toml": cfg.to_toml(),
        "round": state.round,
        "images_seen": state.images_seen,
        "kimg": state.images_seen / 1000,
        "last_round": {str(k): v for k, v in state.last_round.items()},
    }
    if state.client_dp is not None:
        meta["client_dp_accountant"] = state.client_dp["accountant"]
    # The noise seed is secret (predictable noise protects nothing); it stays in the training-state file.
    private = {"server_optimizer": state.optimizer_state, "client_dp_seed": (state.client_dp or {}).get("seed"),
               "previous_mean": state.previous_mean}
    return save_checkpoint_files(run_dir.checkpoints, round_name(state.round), tensors, meta, private, keep=0,
                                 key=key)


def load_server_state(run_dir: RunDir, key: bytes | None = None) -> ServerState:
    if not (run_dir.checkpoints / "latest").is_file():
        raise UserError(f"{run_dir.root}: no federated checkpoint to resume from; start without --resume")
    ckpt = load_checkpoint(run_dir.root, key)
    if "round" not in ckpt.meta:
        raise UserError(f"{ckpt.path} is a centralized checkpoint; resume it without federated.enabled")
    ema = {k: v for k, v in ckpt.tensors.items() if k.startswith("G_ema.")}
    private = ckpt.training_state()
    client_dp = None
    if "client_dp_accountant" in ckpt.meta:
        client_dp = {"accountant": ckpt.meta["client_dp_accountant"], "seed": private["client_dp_seed"]}
    return ServerState(
        round=int(ckpt.meta["round"]),
        global_state={k: v for k, v in ckpt.tensors.items() if not k.startswith("G_ema.")},
        ema_state=ema or None,
        optimizer_state=private["server_optimizer"],
        last_round={int(k): int(v) for k, v in ckpt.meta["last_round"].items()},
        images_seen=int(ckpt.meta["images_seen"]),
        client_dp=client_dp,
        previous_mean=private.get("previous_mean"),
    )


def log_privacy_choices(cfg: Config) -> None:
    """Privacy is the default; every mechanism switched off is said out loud, in the terminal and in run.log."""
    p = cfg.privacy
    off = {
        "privacy.dp": (p.dp, "no differential privacy: the model can memorize patients"),
        "privacy.secagg": (p.secagg, "the server sees each hospital's update"),
        "privacy.encrypt": (p.encrypt, "the SuperLink relays updates in plaintext (TLS protects only each hop)"),
        "privacy.quantize_bits": (bool(p.quantize_bits), "updates travel as full float32"),
    }
    for key, (enabled, consequence) in off.items():
        if not enabled:
            log.warning("%s is off by choice: %s", key, consequence)
    if p.dp:
        log.info("patient-level DP-SGD on each hospital's discriminator, target ε = %g over the whole run",
                 p.target_epsilon)


def wait_for_nodes(grid: Grid, wanted: int, quorum: int, timeout: float) -> list[int]:
    """Node ids once ``wanted`` nodes are connected; after ``timeout`` settle for a quorum or fail clearly."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
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


def _ok(replies: Iterable[Message]) -> tuple[list[Message], list[str]]:
    good, errors = [], []
    for reply in replies:
        if reply.has_error():
            errors.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
        else:
            good.append(reply)
    return good, errors


class Aggregator:
    """One federation from the server's side. ``job`` is the static part of every instruction (config, data)."""

    def __init__(self, cfg: Config, run_dir: RunDir, job: Mapping[str, Any], resume: bool,
                 identity_key: str | None = None,
                 on_round: Callable[[int, Mapping[str, torch.Tensor]], None] | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.checkpoint_key = checkpoint_key(cfg)  # a missing key file fails before any round
        wire.check_settings(cfg.privacy)
        self.transport = wire.Transport(cfg.privacy, str(job["run_id"]), identity_key)
        self.job = dict(job)
        log_privacy_choices(cfg)
        if self.transport.identity_public is not None:
            self.job["aggregator_public"] = self.transport.identity_public
        self.state = load_server_state(run_dir, self.checkpoint_key) if resume else ServerState.initial(cfg)
        self.client_dp = ClientLevelDP(cfg, self.state) if cfg.privacy.client_dp else None
        f = cfg.federated
        self.optimizer = ServerOptimizer(f.strategy, GANTrainer(cfg, device="cpu").parameter_names(("G", "D")),
                                         f.server_lr, f.server_momentum)
        self.optimizer.load_state_dict(self.state.optimizer_state)
        self.on_round = on_round
        self.roster: dict[int, int] = {}  # hospital → node id
        self.weights: dict[int, int] = {}  # hospital → training images
        self.start = time.time()

    # ------------------------------------------------------------------ set-up
    def hello(self, grid: Grid) -> None:
        f = self.cfg.federated
        nodes = wait_for_nodes(grid, f.hospitals, f.quorum, NODE_WAIT_S)
        messages = [Message(msg.instruction(self.job), dst_node_id=n, message_type=msg.HELLO) for n in nodes]
        good, errors = _ok(grid.send_and_receive(messages, timeout=f.round_timeout_s))
        for error in errors:
            log.error("hospital refused to start: %s", error)
        for reply in good:
            info = reply.content[msg.KEY_METRICS]
            hospital = int(info["hospital"])
            if hospital in self.roster:
                raise UserError(f"two nodes both claim hospital {hospital}; give each SuperNode its own hospital-id")
            if not 0 <= hospital < f.hospitals:
                raise UserError(
                    f"a node claims hospital {hospital} but federated.hospitals = {f.hospitals}; "
                    "hospital ids run from 0 to hospitals − 1"
                )
            self.roster[hospital] = reply.metadata.src_node_id
            self.weights[hospital] = int(info["train_images"])
        if len(self.roster) < f.quorum:
            reason = errors[0].split(": ", 1)[-1] if errors else "no replies within federated.round_timeout_s"
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
                raise UserError(f"round {round_} missed its quorum of {f.quorum} hospitals "
                                f"{f.round_retries + 1} time(s); {saved}")
            self.finish_round(round_, outcome)
            if round_ % f.eval_every == 0 or round_ == f.rounds:
                self.evaluate(grid, round_)

    def _instruction(self, round_: int, hospital: int, message_type: str,
                     weights: Mapping[str, torch.Tensor] | None = None, terms: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None) -> Message:
        config = {**self.job, **(terms or {}), **(extra or {}), "round": round_,
                  "resume_round": self.state.last_round.get(hospital, 0)}
        return Message(msg.instruction(config, weights), dst_node_id=self.roster[hospital],
                       message_type=message_type, group_id=str(round_))

    def participants(self, round_: int) -> list[int]:
        f = self.cfg.federated
        return participants(sorted(self.roster), f.fraction, f.quorum, self.cfg.run.seed, round_)

    def exchange(self, grid: Grid, round_: int, messages: dict[int, Message], traffic: RoundTraffic,
                 stage: str) -> dict[int, Message]:
        """Send one message per hospital, return the good replies by hospital; count bytes both ways.

        Replies are matched to hospitals through the message they answer: an error for a node the SuperLink
        declared offline comes from the SuperLink itself, not from the hospital's node."""
        for hospital, message in messages.items():
            traffic.sent[hospital] = traffic.sent.get(hospital, 0) + msg.record_bytes(message.content)
        replies = list(grid.send_and_receive(list(messages.values()), timeout=self.cfg.federated.round_timeout_s))
        by_message = {m.metadata.message_id: h for h, m in messages.items()}
        good: dict[int, Message] = {}
        for reply in replies:
            hospital = by_message.get(reply.metadata.reply_to_message_id)
            if hospital is None:
                continue
            if reply.has_error():
                log.warning("round %d (%s): hospital %d: %s", round_, stage, hospital, reply.error.reason)
                continue
            good[hospital] = reply
            traffic.received[hospital] = traffic.received.get(hospital, 0) + msg.record_bytes(reply.content)
        missing = sorted(set(messages) - set(good))
        if missing:
            log.warning("round %d (%s): no usable reply from hospital(s) %s", round_, stage, missing)
        return dict(sorted(good.items()))

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The tensors a round averages: the shared networks' float weights and statistics. Integer counters
        (BatchNorm's num_batches_tracked) stay out: averaging them means nothing, and their Δ of K steps per round
        would dominate an update's norm and so its clipping and quantization scale."""
        return {k: v for k, v in self.state.global_state.items()
                if k.split(".", 1)[0] in shared_parts(self.cfg) and v.is_floating_point()}

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
        if outcome is None or len(outcome.metrics) < self.cfg.federated.quorum:
            return None
        outcome.traffic = traffic
        return outcome

    def _open(self, round_: int, hospital: int, reply: Message, global_hash: bytes) -> bytes | dict | None:
        try:
            return self.transport.open(msg.record_update(reply.content[msg.KEY_UPDATE]), hospital, round_, global_hash)
        except IntegrityError as exc:
            log.error("round %d: update of hospital %d rejected: %s", round_, hospital, exc)
            return None

    def plain_round(self, grid: Grid, round_: int, chosen: list[int], traffic: RoundTraffic) -> RoundOutcome:
        shared = self.shared_state()
        terms = self.transport.round_terms(round_)
        replies = self.exchange(grid, round_, {h: self._instruction(round_, h, msg.TRAIN, shared, terms)
                                               for h in chosen}, traffic, "train")
        global_hash = wire.model_hash(shared)
        outcome = RoundOutcome()
        for hospital, reply in replies.items():
            payload = self._open(round_, hospital, reply, global_hash)
            if payload is None:
                continue
            try:
                arrays = wire.decode_update(payload, self.cfg.privacy)
            except ValueError as exc:
                log.error("round %d: update of hospital %d rejected: %s", round_, hospital, exc)
                continue
            metrics = dict(reply.content[msg.KEY_METRICS])
            outcome.add(hospital, metrics, {k: torch.as_tensor(np.array(v)) for k, v in arrays.items()},
                        metrics["weight"])
        return outcome

    def secure_round(self, grid: Grid, round_: int, chosen: list[int], traffic: RoundTraffic) -> RoundOutcome | None:
        """Secure aggregation over the Message API: advertise keys → share keys → masked (and sealed) input from
        training → unmask. The server only ever holds the sum of the survivors' integer updates."""
        p = self.cfg.privacy
        shared = self.shared_state()
        arrays = {k: v.numpy() for k, v in shared.items()}
        weights = {h: wire.hospital_weight(p, self.weights[h]) for h in chosen}
        ring_bits = wire.secagg_ring_bits(p.quantize_bits, sum(weights.values()))
        previous = self.state.previous_mean
        t = self.cfg.train
        adam_bound = self.cfg.federated.local_steps * t.d_steps_per_g * max(t.lr_g, t.lr_d)
        scales = wire.shared_scales(p, arrays, None if previous is None else {k: v.numpy() for k, v in previous.items()},
                                    adam_bound)
        ids = tuple(h + 1 for h in chosen)  # SecAgg ids start at 1 (0 is Shamir's secret point)
        holders = len(ids) if not p.secagg_neighbours else min(len(ids), p.secagg_neighbours + 1)
        config = SecAggConfig(ids=ids, threshold=threshold_for(p.secagg_threshold, holders), ring_bits=ring_bits,
                              length=sum(v.size for v in arrays.values()), neighbours=p.secagg_neighbours,
                              context=f"{self.job['run_id']}/{round_}".encode())
        terms = {**self.transport.round_terms(round_), **wire.secagg_terms(config, scales)}
        server = SecAggServer(config)

        replies = self.exchange(grid, round_, {h: self._instruction(round_, h, msg.SECAGG_ADVERTISE, terms=terms)
                                               for h in chosen}, traffic, "advertise keys")
        adverts = server.collect_adverts({h + 1: wire.read_advert(r.content) for h, r in replies.items()})
        keys = wire.adverts_record(adverts)
        replies = self.exchange(grid, round_, {h: self._instruction(round_, h, msg.SECAGG_SHARE, terms=terms, extra=keys)
                                               for h in replies}, traffic, "share keys")
        inbox = server.route_shares({h + 1: wire.read_shares(r.content) for h, r in replies.items()})
        replies = self.exchange(grid, round_, {
            h: self._instruction(round_, h, msg.TRAIN, shared, terms, wire.inbox_record(inbox[h + 1]))
            for h in replies}, traffic, "train")
        global_hash = wire.model_hash(shared)
        masked, metrics = {}, {}
        for hospital, reply in replies.items():
            payload = self._open(round_, hospital, reply, global_hash)
            if payload is not None:
                masked[hospital + 1] = wire.read_masked(payload, ring_bits)
                metrics[hospital] = dict(reply.content[msg.KEY_METRICS])
        survivors = server.collect_masked(masked)
        listed = {"survivors": sorted(survivors)}
        replies = self.exchange(grid, round_, {h - 1: self._instruction(round_, h - 1, msg.SECAGG_UNMASK, terms=terms,
                                                                       extra=listed) for h in survivors},
                                traffic, "unmask")
        total = server.unmask({h + 1: wire.read_reveals(r.content) for h, r in replies.items()})
        summed = wire.dequantize_sum(total, ring_bits, arrays, scales)
        outcome = RoundOutcome()
        outcome.total = {k: torch.as_tensor(np.array(v, np.float64)) for k, v in summed.items()}
        outcome.weight = float(sum(weights[h - 1] for h in survivors))
        outcome.metrics = {h - 1: metrics[h - 1] for h in sorted(survivors)}
        return outcome

    def finish_round(self, round_: int, outcome: RoundOutcome) -> None:
        images = int(sum(m.get("images", 0) for m in outcome.metrics.values()))
        per_hospital = {
            str(h): {**{k: round(float(v), 6) for k, v in m.items()},
                     "bytes_sent_to": outcome.traffic.sent.get(h, 0),
                     "bytes_received_from": outcome.traffic.received.get(h, 0)}
            for h, m in outcome.metrics.items()
        }
        if self.client_dp is not None:
            mean = self.client_dp.noisy_mean(outcome.total, len(self.participants(round_)), round_)
        else:
            mean = mean_of(outcome.total, outcome.weight)
        self.state.previous_mean = {k: v.to(torch.float32) for k, v in mean.items()}
        shared = {k: v for k, v in self.state.global_state.items() if k in mean}
        new_shared = self.optimizer.step(shared, mean)
        self.state.global_state.update(new_shared)
        self.state.round = round_
        self.state.images_seen += images
        for hospital in outcome.metrics:
            self.state.last_round[hospital] = round_
        self._update_ema(images)
        self.state.optimizer_state = self.optimizer.state_dict()
        save_server_state(self.run_dir, self.state, self.cfg, self.checkpoint_key)
        row = {
            "round": round_,
            "kimg": self.state.images_seen / 1000,
            "wall_s": round(time.time() - self.start, 3),
            "hospitals_replied": sorted(outcome.metrics),
            "d_loss": _mean(per_hospital, "d_loss"),
            "g_loss": _mean(per_hospital, "g_loss"),
            "img_per_s": sum(h.get("img_per_s", 0.0) for h in per_hospital.values()),
            "hospital": per_hospital,
        }
        eps = [(m["epsilon"], m["delta"]) for m in outcome.metrics.values() if "epsilon" in m]
        if eps:
            # The worst hospital's spend is the federation's patient-level guarantee.
            row["epsilon"], row["delta"] = max(e for e, _ in eps), max(d for _, d in eps)
        if self.client_dp is not None:
            row.update(self.client_dp.metrics())
        self.run_dir.append_metrics(row)
        losses = ", ".join(f"{k} {row[k]:.3f}" for k in ("d_loss", "g_loss") if row[k] is not None)
        spent = f", ε ≤ {row['epsilon']:.3f}" if "epsilon" in row else ""
        log.info("round %d/%d: %d hospitals, %s%s", round_, self.cfg.federated.rounds, len(outcome.metrics), losses, spent)
        if self.on_round is not None:
            self.on_round(round_, self.generator_state())

    def _update_ema(self, images: int) -> None:
        if self.state.ema_state is None or images == 0:
            return
        # Half-life in images, as in centralized training, measured over all hospitals' images this round.
        beta = 0.5 ** (images / max(self.cfg.train.ema_kimg * 1000.0, 1e-8))
        for key, ema in self.state.ema_state.items():
            current = self.state.global_state[key.replace("G_ema.", "G.", 1)]
            ema.copy_(torch.lerp(current.to(ema.dtype), ema, beta) if ema.is_floating_point() else current)

    def generator_state(self) -> dict[str, torch.Tensor]:
        """The generator to sample from: the EMA when kept, else the global G, with ``G.`` keys."""
        if self.state.ema_state is not None:
            return {k.replace("G_ema.", "G.", 1): v for k, v in self.state.ema_state.items()}
        return {k: v for k, v in self.state.global_state.items() if k.startswith("G.")}

    def evaluate(self, grid: Grid, round_: int) -> None:
        """The server's sample grid from fixed latents, then hospitals score the global generator on their
        held-out patients; only the scalars come back."""
        generator = self.generator_state()
        trainer = GANTrainer(self.cfg, device="cpu")
        trainer.load_model_state(generator)
        save_sample_grid(trainer, fixed_latents(trainer.G.z_dim, self.cfg.run.seed),
                         self.run_dir.samples / f"{round_name(round_)}.png")
        out = [self._instruction(round_, h, msg.EVALUATE, generator) for h in sorted(self.roster)]
        good, errors = _ok(grid.send_and_receive(out, timeout=self.cfg.federated.round_timeout_s))
        for error in errors:
            log.warning("evaluation round %d: %s", round_, error)
        results = [dict(r.content[msg.KEY_METRICS]) for r in good]
        results = [r for r in results if r.get("holdout_images", 0) > 0]
        if not results:
            return
        total = sum(r["holdout_images"] for r in results)
        keys = sorted({k for r in results for k in r} - {"holdout_images"})
        row = {"round": round_, "eval": {k: sum(r[k] * r["holdout_images"] for r in results if k in r) / total
                                         for k in keys}, "eval_hospitals": len(results)}
        self.run_dir.append_metrics(row)
        log.info("round %d evaluation: %s", round_, ", ".join(f"{k} {v:.4g}" for k, v in row["eval"].items()))


class ClientLevelDP:
    """DP-FedAvg (McMahan et al. 2018) on the server: updates arrive clipped to C by each hospital (so this works
    under secure aggregation too); the server adds N(0, σ²C²) to their sum and divides by the round's planned
    number of participants, fixed before anyone replies. Its accountant (unit = hospital, one step per round)
    lives in the server checkpoint and only grows."""

    def __init__(self, cfg: Config, state: ServerState):
        import secrets

        from medsyngan.privacy.accounting import PrivacyAccountant, client_level_accountant

        self.privacy = cfg.privacy
        self.state = state
        if state.client_dp is None:
            accountant = client_level_accountant(cfg.federated.fraction, cfg.privacy.client_noise,
                                                 cfg.federated.hospitals, cfg.privacy.delta)
            state.client_dp = {"accountant": accountant.state_dict(), "seed": secrets.randbits(63)}
        self.accountant = PrivacyAccountant.from_state_dict(state.client_dp["accountant"])

    def noisy_mean(self, total_sum: Mapping[str, torch.Tensor], planned: int, round_: int) -> dict[str, torch.Tensor]:
        from medsyngan.privacy.codec import add_client_dp_noise

        total = {k: v.to(torch.float64).numpy() for k, v in total_sum.items()}
        rng = np.random.default_rng([self.state.client_dp["seed"], round_])
        noisy = add_client_dp_noise(total, self.privacy.client_clip, self.privacy.client_noise, rng)
        self.accountant.step(1)
        self.state.client_dp["accountant"] = self.accountant.state_dict()
        return {k: torch.as_tensor(np.array(v, np.float64)) / planned for k, v in noisy.items()}

    def metrics(self) -> dict[str, float]:
        eps = self.accountant.epsilon()
        return {"client_epsilon": eps["reported"], "client_epsilon_rdp": eps["rdp"], "client_epsilon_prv": eps["prv"]}


def _mean(per_hospital: Mapping[str, Mapping[str, float]], key: str) -> float | None:
    """Mean over hospitals of a reported number; None when none reports it (a private D keeps its real loss)."""
    values = [h[key] for h in per_hospital.values() if key in h]
    return sum(values) / len(values) if values else None
