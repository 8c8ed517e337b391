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
from medsyngan.federated.protocol import PUBLIC_REPORT, EvaluationReply
from medsyngan.privacy.accounting import RELATION, format_epsilon
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
    """What a round produced: Σ w_k Δ_k over the accepted hospitals, Σ w_k, each one's public report and (only
    when neither DP nor secure aggregation is on) the statistics it sealed into its update."""

    total: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 0.0
    reports: dict[int, dict[str, float]] = field(default_factory=dict)
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    traffic: RoundTraffic = field(default_factory=RoundTraffic)

    def add(self, hospital: int, report: dict[str, float], update: Mapping[str, torch.Tensor], weight: float,
            stats: dict[str, float]) -> None:
        accumulate(self.total, update, weight)
        self.weight += weight
        self.reports[hospital] = report
        self.stats[hospital] = stats


#: All that metrics.jsonl says about one hospital in a round (docs/privacy.md, "Threat model"): its privacy spend
#: as it reported it, its registered training images and FedAvg weight (the roster), the bytes the aggregator
#: counted, and, only when neither DP nor secure aggregation is on, the statistics sealed into its update.
HOSPITAL_FIELDS = PUBLIC_REPORT + ("relation", "train_images", "weight", "bytes_sent_to", "bytes_received_from")
#: The fields of a round's row (``time`` is the aggregator's clock, stamped by the run directory); d_loss and g_loss
#: are means of the hospitals' statistics when they send any; client_* is client-level DP's accountant;
#: stage_resolution and alpha are a growing model's position on the aggregator's own schedule.
ROUND_FIELDS = ("round", "time", "kimg", "wall_s", "hospitals_replied", "d_loss", "g_loss", "epsilon", "delta",
                "relation", "hospital", "client_epsilon", "client_epsilon_add_remove", "stage_resolution", "alpha")


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
    if p.dp and p.clip_only:
        log.warning("privacy.clip_only: each hospital's discriminator trains with DP-SGD's sampling and clipping but "
                    "no noise (σ = 0): NO privacy, ε = ∞")
    elif p.dp:
        log.info("patient-level DP-SGD on each hospital's discriminator, target ε = %g over the whole run",
                 p.target_epsilon)


def round_row(round_: int, outcome: RoundOutcome, images_seen: int, wall_s: float,
              roster: Mapping[int, tuple[int, int]], with_stats: bool) -> dict[str, Any]:
    """The metrics row of a completed round (only :data:`ROUND_FIELDS`; per hospital :data:`HOSPITAL_FIELDS`, plus
    its statistics when ``with_stats``): the worst hospital's privacy spend, and losses averaged over hospitals
    when they sent any. ``roster``: each hospital's (registered training images, FedAvg weight)."""
    per_hospital = {}
    for h, report in outcome.reports.items():
        entry: dict[str, Any] = {k: round(float(report[k]), 6) for k in PUBLIC_REPORT if k in report}
        if "epsilon" in entry:
            entry["relation"] = RELATION
        stats = outcome.stats.get(h, {}) if with_stats else {}
        entry.update({k: round(float(v), 6) for k, v in stats.items() if k not in HOSPITAL_FIELDS})
        entry.update(train_images=roster[h][0], weight=roster[h][1],
                     bytes_sent_to=outcome.traffic.sent.get(h, 0),
                     bytes_received_from=outcome.traffic.received.get(h, 0))
        per_hospital[str(h)] = entry
    row: dict[str, Any] = {
        "round": round_,
        "kimg": images_seen / 1000,
        "wall_s": round(wall_s, 3),
        "hospitals_replied": sorted(outcome.reports),
        "d_loss": _mean(per_hospital, "d_loss"),
        "g_loss": _mean(per_hospital, "g_loss"),
        "hospital": per_hospital,
    }
    eps = [(r["epsilon"], r["delta"]) for r in outcome.reports.values() if "epsilon" in r and "delta" in r]
    if eps:
        # The worst hospital's spend is the federation's patient-level guarantee.
        row["epsilon"], row["delta"], row["relation"] = max(e for e, _ in eps), max(d for _, d in eps), RELATION
    return row


def log_round(row: Mapping[str, Any], rounds: int) -> None:
    parts = [f"{len(row['hospitals_replied'])} hospitals"]
    parts += [f"{k} {row[k]:.3f}" for k in ("d_loss", "g_loss") if row[k] is not None]
    if "epsilon" in row:
        parts.append(f"ε ≤ {format_epsilon(row['epsilon'], '.3f')} ({row['relation']})")
    log.info("round %d/%d: %s", row["round"], rounds, ", ".join(parts))


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
