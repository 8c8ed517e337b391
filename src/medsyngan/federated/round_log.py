"""What the aggregator records about a federation: the privacy choices at start, one metrics row per round, the
evaluation rows, and the sample grid from fixed latents."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsyngan.config import Config
from medsyngan.federated.aggregation import accumulate
from medsyngan.federated.protocol import EvaluationReply
from medsyngan.training.generate import fixed_latents, save_sample_grid
from medsyngan.training.step import GANTrainer

log = logging.getLogger("medsyngan.federated")


@dataclass
class RoundTraffic:
    """Payload bytes per hospital over all of a round's stages."""

    sent: dict[int, int] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)

    def count(self, table: dict[int, int], hospital: int, size: int) -> None:
        table[hospital] = table.get(hospital, 0) + size


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


def round_row(round_: int, outcome: RoundOutcome, images_seen: int, wall_s: float) -> dict[str, Any]:
    """The metrics row of a completed round: losses averaged over hospitals, throughput, bytes and the worst
    hospital's privacy spend."""
    per_hospital = {
        str(h): {**{k: round(float(v), 6) for k, v in m.items()},
                 "bytes_sent_to": outcome.traffic.sent.get(h, 0),
                 "bytes_received_from": outcome.traffic.received.get(h, 0)}
        for h, m in outcome.metrics.items()
    }
    row: dict[str, Any] = {
        "round": round_,
        "kimg": images_seen / 1000,
        "wall_s": round(wall_s, 3),
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
    return row


def log_round(row: Mapping[str, Any], rounds: int) -> None:
    losses = ", ".join(f"{k} {row[k]:.3f}" for k in ("d_loss", "g_loss") if row[k] is not None)
    spent = f", ε ≤ {row['epsilon']:.3f}" if "epsilon" in row else ""
    log.info("round %d/%d: %d hospitals, %s%s", row["round"], rounds, len(row["hospitals_replied"]), losses, spent)


def evaluation_row(round_: int, replies: list[EvaluationReply]) -> dict[str, Any] | None:
    """Hospitals' held-out scores weighted by their held-out images; None when no hospital holds any out."""
    results = [r.metrics for r in replies if r.holdout_images > 0]
    if not results:
        return None
    total = sum(r["holdout_images"] for r in results)
    keys = sorted({k for r in results for k in r} - {"holdout_images"})
    scores = {k: sum(r[k] * r["holdout_images"] for r in results if k in r) / total for k in keys}
    row = {"round": round_, "eval": scores, "eval_hospitals": len(results)}
    log.info("round %d evaluation: %s", round_, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return row


def save_round_grid(cfg: Config, generator: Mapping[str, torch.Tensor], path: Path) -> None:
    """The server's sample grid of the global generator from the run's fixed latents."""
    trainer = GANTrainer(cfg, device="cpu")
    trainer.load_model_state(generator, keep_stage=True)
    save_sample_grid(trainer, fixed_latents(trainer.G.z_dim, cfg.run.seed), path)


def _mean(per_hospital: Mapping[str, Mapping[str, float]], key: str) -> float | None:
    """Mean over hospitals of a reported number; None when none reports it (a private D keeps its real loss)."""
    values = [h[key] for h in per_hospital.values() if key in h]
    return sum(values) / len(values) if values else None
