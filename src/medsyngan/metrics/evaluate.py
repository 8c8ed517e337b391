"""One evaluation: every requested metric on a synthetic set against real sets, named by its protocol.

Sets: ``fake`` (synthetic), ``real`` (real images the model did not train on — the reference distribution and,
for the privacy audit, the holdout / non-members) and optionally ``train`` (the training images — the
memorization and membership references). The metrics themselves live in :mod:`medsyngan.metrics.registry`; a
metric that cannot be computed (too few images, missing weights) or does not apply (no training set, no
generator) is recorded in ``Evaluation.skipped`` with its one-line reason and the others still run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.metrics.context import Features, MetricContext, MetricOptions, NotApplicable
from medsyngan.metrics.features import FeatureExtractor
from medsyngan.metrics.pixel import NearestNeighbours
from medsyngan.metrics.privacy_audit import AttackResult, DcrResult
from medsyngan.metrics.registry import METRICS, Metric, parse_metrics

log = logging.getLogger("medsyngan")

# One point per snapshot on a curve: fewer KID subsets than a final evaluation, the trend is what is read.
SNAPSHOT_KID_SUBSETS = 20


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # each metric's detail object, by metric name
    nn_threshold: float = 0.95
    epsilon: float | None = None
    delta: float | None = None

    not_applicable: set[str] = field(default_factory=set)

    def skip(self, group: str, reason: str, applicable: bool = True) -> None:
        """Record a metric that was not computed; ``applicable=False`` when the inputs simply do not allow it
        (no training set, no generator), as opposed to a failure (too few images, missing weights)."""
        self.skipped[group] = reason
        if not applicable:
            self.not_applicable.add(group)
        log.warning("%s skipped: %s", group, reason)

    def run(self, metric: Metric, ctx: MetricContext) -> None:
        """Compute ``metric`` on ``ctx`` and record its values, protocol and detail, or why it was skipped."""
        try:
            result = metric(ctx)
        except NotApplicable as exc:
            self.skip(metric.name, str(exc), applicable=False)
        except UserError as exc:
            self.skip(metric.name, str(exc))
        else:
            self.metrics.update(result.values)
            self.protocol.update(result.protocol)
            if result.detail is not None:
                self.details[metric.name] = result.detail

    @property
    def failed(self) -> dict[str, str]:
        return {g: r for g, r in self.skipped.items() if g not in self.not_applicable}

    @property
    def nn(self) -> NearestNeighbours | None:
        """Each synthetic image's closest training image (the report's nearest-neighbour panel)."""
        return self.details.get("nn")

    @property
    def dcr(self) -> dict[str, DcrResult]:
        audit = self.details.get("privacy")
        return audit.dcr if audit is not None else {}

    @property
    def attacks(self) -> list[AttackResult]:
        audit = self.details.get("privacy")
        return audit.attacks if audit is not None else []


def evaluate(
    fake_u8: np.ndarray,
    real_u8: np.ndarray,
    train_u8: np.ndarray | None = None,
    *,
    metrics: str | list[str] = "default",
    feature_extractor: str | FeatureExtractor = "random",
    generator: torch.nn.Module | None = None,
    discriminator: torch.nn.Module | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    real_patients: np.ndarray | None = None,
    train_patients: np.ndarray | None = None,
    fake_labels: np.ndarray | None = None,
    real_labels: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
    label_names: tuple[str, ...] | None = None,
    verifier_images: np.ndarray | None = None,
    verifier_patients: np.ndarray | None = None,
    reference_fake: np.ndarray | None = None,
    nn_threshold: float = 0.95,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    msssim_pairs: int = 1000,
    ppl_samples: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Images are uint8 [N, S, S] at one resolution. ``generator`` enables PPL, ``discriminator`` the LOGAN
    attack, ``epsilon``/``delta`` the DP bound beside the attacks; ``*_patients`` check that the holdout is
    patient-disjoint from the training set. ``*_labels`` ([N, C] per set) with ``label_names`` enable
    utility; ``verifier_images``/``verifier_patients`` the re-identification audit; ``reference_fake`` the
    reference generator's membership attack (see :class:`MetricContext`)."""
    names = parse_metrics(metrics)
    ctx = MetricContext(
        np.asarray(fake_u8), np.asarray(real_u8), None if train_u8 is None else np.asarray(train_u8),
        real_patients=real_patients, train_patients=train_patients,
        fake_labels=fake_labels, real_labels=real_labels, train_labels=train_labels, label_names=label_names,
        verifier_images=verifier_images, verifier_patients=verifier_patients, reference_fake=reference_fake,
        features=Features(feature_extractor, device, batch_size), generator=generator, discriminator=discriminator,
        epsilon=epsilon, delta=delta, seed=seed, device=device,
        options=MetricOptions(nn_threshold=nn_threshold, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                              msssim_pairs=msssim_pairs, ppl_samples=ppl_samples, batch_size=batch_size),
    )
    ev = Evaluation(nn_threshold=nn_threshold, epsilon=epsilon, delta=delta)
    ev.protocol = {
        "synthetic": len(ctx.fake), "real": len(ctx.real), "train": 0 if ctx.train is None else len(ctx.train),
        "resolution": ctx.resolution, "seed": seed, "metrics": names,
    }
    for metric in METRICS.values():
        if metric.name in names:
            ev.run(metric, ctx)
    return ev


def evaluate_images(fake_u8: np.ndarray, real_u8: np.ndarray, train_u8: np.ndarray | None = None, **kwargs) -> dict[str, float]:
    """The metrics of :func:`evaluate` as a flat ``{protocol-named key: value}`` dict (skipped ones absent)."""
    return evaluate(fake_u8, real_u8, train_u8, **kwargs).metrics


def privacy_from_rows(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """ε and δ of a run from its metrics.jsonl rows: the largest ε logged (ε only grows; with several hospitals
    the federated rows carry the worst one)."""
    eps = [r["epsilon"] for r in rows if isinstance(r.get("epsilon"), (int, float))]
    deltas = [r["delta"] for r in rows if isinstance(r.get("delta"), (int, float))]
    return (max(eps) if eps else None), (max(deltas) if deltas else None)


def evaluate_snapshots(
    checkpoints: list[Path], real_u8: np.ndarray, extractor: FeatureExtractor, count: int, seed: int = 0,
    batch_size: int = 64, device: torch.device | str = "cpu", key: bytes | None = None,
) -> list[dict[str, Any]]:
    """FD and KID (the registered ``fd`` and ``kid`` metrics) of ``count`` samples from every checkpoint: a curve
    over kimg / rounds. A damaged checkpoint is reported and skipped. ``key`` opens encrypted checkpoints."""
    from medsyngan.training.generate import generate_images, load_generator

    features = Features(extractor, device, batch_size)
    features.of("real", real_u8)
    options = MetricOptions(kid_subsets=SNAPSHOT_KID_SUBSETS, batch_size=batch_size)
    rows = []
    for path in checkpoints:
        try:
            G, meta = load_generator(path, device, key)
            fake = generate_images(G, count, seed, batch_size=batch_size, device=device)
            ctx = MetricContext(fake, real_u8, features=features.for_other_synthetic_set(), seed=seed, device=device,
                                options=options)
            row: dict[str, Any] = {k: meta[k] for k in ("step", "kimg", "round") if isinstance(meta.get(k), (int, float))}
            row["checkpoint"] = path.name
            row.update(METRICS["fd"](ctx).values)
            # the curves plot the KID mean only; a spread over this few subsets would be one more noisy line
            row.update((k, v) for k, v in METRICS["kid"](ctx).values.items() if not k.endswith("_std"))
        except UserError as exc:
            log.warning("snapshot %s skipped: %s", path.name, exc)
            continue
        rows.append(row)
    return rows
