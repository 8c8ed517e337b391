"""Detectability: can a classifier tell the synthetic films from real ones? (classifier two-sample test)

Lopez-Paz & Oquab (2017): if a classifier trained on part of two samples cannot separate their held-out parts, the
samples are indistinguishable to that classifier. :func:`two_sample_test` takes as many real as synthetic films
(the smaller count of the two, drawn at random) and splits each set in halves — the real films by patient, so
that no patient's follow-up film is scored by a network that learnt from another film of that patient. The
:class:`~medsyngan.metrics.classifier.SmallCNN` with one output (synthetic = 1) is trained for :data:`DETECTOR`
(a few epochs: seconds at 64 px for a few hundred films) on one half of each set and scores the other halves,
then the halves swap (two-fold cross-fitting: every film is scored once, by the network that did not see it).
This is repeated :data:`REPEATS` times with fresh halves and initial weights. Reported: the mean of the folds'
AUROCs, 0.5 = indistinguishable, 1 = every synthetic film recognised, with a 95 % bootstrap interval (real
films resampled by patient, synthetic films one by one, each set at its size). The interval is the films'
sampling error; what remains of the networks' own variation after averaging the repeats is not in it (on 150
real NIH films against real training films, the figure moved between 0.46 and 0.55 over four seeds).

It answers a narrower question than a reader study: a small CNN trained on a few hundred films finds texture,
noise and layout artefacts; passing it is necessary, not sufficient, for films a radiologist would accept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsyngan.errors import UserError
from medsyngan.metrics.auroc import Estimate, auroc, bootstrap_weights, weighted_auroc
from medsyngan.metrics.classifier import ClassifierSettings, predict, train_classifier
from medsyngan.metrics.context import count_tag

DETECTOR = ClassifierSettings(epochs=8, min_steps=40)
MIN_FILMS = 8  # per set: two halves of four
REPEATS = 3  # cross-fittings averaged: one network's luck moves the AUROC of a few hundred films by ±0.1


@dataclass
class DetectabilityResult:
    """The test's AUROC and, for the report, which films were held out and the 'synthetic' probability of each."""

    films: int  # films of each set used
    resolution: int
    auroc: Estimate
    real_index: np.ndarray  # the real films used (indices into the real set)
    fake_index: np.ndarray  # the synthetic films used
    real_scores: np.ndarray  # each film's mean score from the networks that did not train on it
    fake_scores: np.ndarray

    def values(self) -> dict[str, float]:
        return self.auroc.keys(f"c2st_auroc{count_tag(self.films)}_{self.resolution}")


def _halves(patients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A boolean 'training half' mask over films, whole patients at a time, as close to half the films as the
    patients allow (and never all or none of them)."""
    ids, codes, counts = np.unique(patients, return_inverse=True, return_counts=True)
    taken, total, chosen = 0, len(patients), np.zeros(len(ids), bool)
    for p in rng.permutation(len(ids)):
        if taken + counts[p] <= total / 2 or taken == 0:
            chosen[p], taken = True, taken + counts[p]
    if chosen.all():
        chosen[rng.integers(len(ids))] = False
    return chosen[codes]


def two_sample_test(real: np.ndarray, fake: np.ndarray, real_patients: np.ndarray | None = None,
                    settings: ClassifierSettings = DETECTOR, bootstrap: int = 1000, seed: int = 0,
                    repeats: int = REPEATS) -> DetectabilityResult:
    """The classifier two-sample test of the module docstring; ``real_patients`` (one id per real film) keeps a
    patient's films on one side of the split, without them every real film is its own patient."""
    n = min(len(real), len(fake))
    if n < MIN_FILMS:
        raise UserError(f"the detectability test needs at least {MIN_FILMS} real and {MIN_FILMS} synthetic films; "
                        f"got {len(real)} and {len(fake)}")
    rng = np.random.default_rng(seed)
    ri = np.sort(rng.choice(len(real), n, replace=False))
    fi = np.sort(rng.choice(len(fake), n, replace=False))
    patients = (np.asarray(real_patients, dtype=str)[ri] if real_patients is not None
                else np.array([f"film{i}" for i in ri]))
    if len(np.unique(patients)) < 2:
        raise UserError("the detectability test needs real films of at least 2 patients to split them by patient")
    labels = np.r_[np.zeros(n), np.ones(n)]
    groups = np.r_[[f"real:{p}" for p in patients], [f"synthetic:{i}" for i in fi]]
    weights = bootstrap_weights(groups, bootstrap, seed, strata=labels)
    values, replicates, total = [], [], np.zeros(2 * n)
    for repeat in range(repeats):
        real_fold = _halves(patients, rng)
        fake_fold = np.zeros(n, bool)
        fake_fold[rng.permutation(n)[: n // 2]] = True
        rs, fs = np.zeros(n), np.zeros(n)
        for fold in (True, False):  # train on one half of each set, score the other half, then swap
            r, f = real_fold == fold, fake_fold == fold
            targets = np.r_[np.zeros(r.sum()), np.ones(f.sum())][:, None]
            net = train_classifier(np.concatenate([real[ri[r]], fake[fi[f]]]), targets, settings, seed + repeat)
            rs[~r], fs[~f] = predict(net, real[ri[~r]])[:, 0], predict(net, fake[fi[~f]])[:, 0]
        scores, scored_by = np.r_[rs, fs], np.r_[real_fold, fake_fold]  # scored_by: which fold's network
        for k in (True, False):
            m = scored_by == k
            values.append(auroc(scores[m], labels[m]))
            replicates.append(weighted_auroc(scores[m], labels[m], weights[:, m]))
        total += scores
    estimate = Estimate.of(float(np.mean(values)), np.mean(replicates, axis=0))
    return DetectabilityResult(n, int(real.shape[-1]), estimate, ri, fi, total[:n] / repeats, total[n:] / repeats)
