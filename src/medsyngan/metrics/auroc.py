"""AUROC with a bootstrap interval that resamples patients, not films.

Films of one patient are not independent (follow-ups share anatomy, devices, often findings), so resampling
films would make an interval too narrow. :func:`bootstrap_weights` draws, for each replicate, patients with
replacement and gives every film its patient's multiplicity; :func:`weighted_auroc` is the Mann–Whitney AUROC
under those weights (ties count one half), for all replicates at once. One weight matrix serves every label and
every classifier scored on the same films, so differences between classifiers get a paired interval::

    w = bootstrap_weights(patients, n=1000, seed=0)           # [1000, N]
    value = auroc(scores, labels)                             # on the films as they are
    lo, hi = interval(weighted_auroc(scores, labels, w))      # 2.5th and 97.5th percentiles

``strata``: resample patients within each stratum separately (the two-sample test keeps its real and synthetic
halves at their sizes). A replicate with no positive or no negative film is NaN and left out of the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def bootstrap_weights(groups: np.ndarray, n: int, seed: int, strata: np.ndarray | None = None) -> np.ndarray:
    """[n, films] multiplicities: each replicate draws the groups (patients) with replacement, within strata."""
    _, group = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    group_stratum = np.zeros(group.max() + 1, np.int64) if len(group) else np.zeros(0, np.int64)
    if strata is not None:
        _, codes = np.unique(np.asarray(strata), return_inverse=True)
        group_stratum[group] = codes
    rng = np.random.default_rng(seed)
    counts = np.zeros((n, len(group_stratum)))
    for s in np.unique(group_stratum):
        members = np.flatnonzero(group_stratum == s)
        draws = rng.integers(0, len(members), size=(n, len(members)))
        np.add.at(counts, (np.arange(n)[:, None], members[draws]), 1.0)
    return counts[:, group]


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``scores`` for binary ``labels`` under each row of ``weights`` ([R, N] → [R]; NaN when a row
    weighs no positive or no negative film)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, np.float64)
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order], np.asarray(weights, np.float64)[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # one group per distinct score: ties count one half
    pos = np.add.reduceat(w * y, starts, axis=1) if len(s) else np.zeros((len(w), 0))
    neg = np.add.reduceat(w * (1 - y), starts, axis=1) if len(s) else np.zeros((len(w), 0))
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC on the films as they are (NaN without both classes)."""
    return float(weighted_auroc(scores, labels, np.ones((1, len(scores))))[0])


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite replicates (NaN, NaN when there are none)."""
    finite = np.asarray(replicates)[np.isfinite(replicates)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Estimate:
    """A value with its bootstrap interval."""

    value: float
    lo: float
    hi: float

    @classmethod
    def of(cls, value: float, replicates: np.ndarray) -> Estimate:
        return cls(float(value), *interval(replicates))

    def keys(self, key: str) -> dict[str, float]:
        """``{key: value, key_lo: lo, key_hi: hi}``."""
        return {key: self.value, f"{key}_lo": self.lo, f"{key}_hi": self.hi}


def balanced_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Mean of the two classes' recalls when a score above ``threshold`` means class 1: chance is 0.5 whatever
    the class sizes (a judge of a rare class is thresholded at that class's training prevalence)."""
    predicted, labels = np.asarray(scores) > threshold, np.asarray(labels).astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("balanced accuracy needs films of both classes")
    return float((predicted[labels].mean() + (~predicted[~labels]).mean()) / 2)
