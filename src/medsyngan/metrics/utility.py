"""Utility of synthetic films: train on synthetic, test on real (TSTR; RoentGen, Packhäuser et al. 2023, CheXGenBench).

The question a hospital asks first: does a classifier trained only on the synthetic films work on real patients?
:func:`utility_audit` trains the same :class:`~medsyngan.metrics.classifier.SmallCNN` (one sigmoid output per
label) on several training sets and scores each on the real evaluation patients:

- ``synth``: the labelled synthetic films only (a conditional generator's films with the labels they were asked for);
- ``real``: the real training films — the ceiling the synthetic films are measured against;
- ``dp``: the real training films with patient-level DP-SGD at ε (:mod:`medsyngan.metrics.private_classifier`;
  the same network, with the larger batch and step DP-SGD needs, :data:`DP_CLASSIFIER`) — the baseline a DP
  generator must beat, since a hospital could release that classifier instead;
- ``augment``: the real training films plus the synthetic films of the rare findings, scored on the rare findings
  only — whether synthetic films help where real ones are scarce (a separate figure);
- ``fidelity``: not a classifier of its own but the real-trained one applied to the synthetic films, scored against
  the labels each film was generated from (label fidelity, the conditional-accuracy check of RoentGen and
  CheXGenBench): does a film show what it was asked for? A label the generator draws the wrong way round scores
  below 0.5 here, and no classifier trained on such films can do well on real patients. Its interval resamples
  synthetic films, and a label is scored when at least ``min_patients`` synthetic films carry it and as many do not.

Labels (:func:`binary_targets`): view position (``view_pa``: PA = 1, AP = 0), sex (``sex_male``), ``any_finding``
and each NIH finding, one binary column each, NaN where unknown. A label is scored when the evaluation set holds
at least ``min_patients`` (default :data:`MIN_PATIENTS`) patients with a positive film and as many with a negative
one: below that one patient moves the AUROC by 0.1 or more and the interval is all the figure says. A finding is
rare when under ``rare_prevalence`` (default :data:`RARE_PREVALENCE`) of the real training films carry it.

Reported per classifier and scored label: AUROC with a 95 % bootstrap interval that resamples patients
(:mod:`medsyngan.metrics.auroc`); the mean AUROC over the scored labels; and the gaps synth − real and
synth − dp with paired intervals (the same patient resamples for both classifiers).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medsyngan.errors import UserError
from medsyngan.metrics.auroc import Estimate, auroc, bootstrap_weights, weighted_auroc
from medsyngan.metrics.classifier import (ClassifierSettings, SmallCNN, cache_key, cached_network, predict, seeded,
                                          train_classifier)
from medsyngan.metrics.context import count_tag
from medsyngan.metrics.private_classifier import DP_CLASSIFIER, PrivateTraining, train_private_classifier

log = logging.getLogger("medsyngan")

NIH_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis", "Hernia",
                "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax")
MIN_PATIENTS = 5
RARE_PREVALENCE = 0.10
DEFAULT_EPSILON = 1.0  # the DP baseline's ε when neither the options nor the run give one: the product's default


def key_name(label: str) -> str:
    """A label as it appears in a metric key: 'Pleural_Thickening' → 'pleural_thickening'."""
    name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
    if not name:
        raise UserError(f"label name {label!r} has no letters or digits; name every label column")
    return name


def binary_targets(findings: Sequence[Sequence[str]], views: Sequence[str] | None = None,
                   sexes: Sequence[str] | None = None, finding_names: Sequence[str] = NIH_FINDINGS
                   ) -> tuple[tuple[str, ...], np.ndarray]:
    """Label names and a float matrix [N, C] (1, 0, NaN = unknown) from per-film findings (a tuple of finding
    names, empty for none), views ('PA'/'AP', anything else unknown) and sexes ('M'/'F', else unknown)."""
    n = len(findings)
    columns: list[tuple[str, np.ndarray]] = []
    for name, values, positive, negative in (("view_pa", views, "PA", "AP"), ("sex_male", sexes, "M", "F")):
        if values is None:
            continue
        if len(values) != n:
            raise UserError(f"{len(values)} {name.split('_')[0]} values for {n} films; give one per film")
        v = np.array([str(x).strip().upper() for x in values])
        columns.append((name, np.where(v == positive, 1.0, np.where(v == negative, 0.0, np.nan))))
    columns.append(("any_finding", np.array([1.0 if f else 0.0 for f in findings])))
    for finding in finding_names:
        columns.append((key_name(finding), np.array([1.0 if finding in f else 0.0 for f in findings])))
    return tuple(name for name, _ in columns), np.stack([c for _, c in columns], axis=1).reshape(n, len(columns))


def scorable(labels: np.ndarray, patients: np.ndarray, names: Sequence[str], minimum: int
             ) -> tuple[list[int], dict[str, str]]:
    """Columns with at least ``minimum`` positive and ``minimum`` negative patients, and why the others are not."""
    patients = np.asarray(patients, dtype=str)
    scored, skipped = [], {}
    for c, name in enumerate(names):
        pos = len(np.unique(patients[labels[:, c] == 1]))
        neg = len(np.unique(patients[labels[:, c] == 0]))
        if min(pos, neg) >= minimum:
            scored.append(c)
        else:
            skipped[name] = f"{pos} positive / {neg} negative evaluation patients (fewer than {minimum})"
    return scored, skipped


@dataclass(frozen=True)
class UtilitySettings:
    classifier: ClassifierSettings = ClassifierSettings()
    dp_classifier: ClassifierSettings = DP_CLASSIFIER  # the same network, DP-SGD's batch and step
    bootstrap: int = 1000
    min_patients: int = MIN_PATIENTS
    rare_prevalence: float = RARE_PREVALENCE
    epsilon: float = DEFAULT_EPSILON  # target ε of the DP baseline
    delta: float = 0.0  # 0: the product's default δ for the patient count
    max_grad_norm: float = 1.0


@dataclass
class Scores:
    """One classifier on the evaluation patients: AUROC per scored label (value, interval) and the bootstrap
    replicates [R, labels] the paired gaps are computed from."""

    films: int
    per_label: dict[str, Estimate]
    replicates: np.ndarray

    def mean(self, labels: Sequence[str] | None = None) -> tuple[float, np.ndarray]:
        """Mean AUROC over ``labels`` (default all scored) and its replicates (NaN where any label's is)."""
        cols = [i for i, name in enumerate(self.per_label) if labels is None or name in labels]
        values = [est.value for est in self.per_label.values()]
        return float(np.mean([values[i] for i in cols])), self.replicates[:, cols].mean(axis=1)


@dataclass
class UtilityResult:
    resolution: int
    labels: list[str]  # scored, in column order
    skipped: dict[str, str]  # label → why it is not scored
    rare: list[str]
    scores: dict[str, Scores] = field(default_factory=dict)  # 'synth', 'real', 'dp', 'augment', 'fidelity'
    dp: PrivateTraining | None = None
    augment_films: int = 0  # synthetic films added to the real ones for 'augment'

    def tag(self, kind: str) -> str:
        """'<kind><films>_<resolution>' (and '_eps<ε>' for the DP baseline): the protocol part of a key."""
        eps = self.eps_tag() if kind == "dp" else ""
        return f"{kind}{count_tag(self.scores[kind].films)}_{self.resolution}{eps}"

    def eps_tag(self) -> str:
        return f"_eps{self.dp.target_epsilon:g}" if self.dp is not None else ""

    def values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, s in self.scores.items():
            for name, est in s.per_label.items():
                out.update(est.keys(f"auroc_{self.tag(kind)}_{name}"))
            suffix = "rare_mean" if kind == "augment" else "mean"
            out.update(Estimate.of(*s.mean()).keys(f"auroc_{self.tag(kind)}_{suffix}"))
        synth = self.scores["synth"]
        for kind in ("real", "dp"):
            if kind in self.scores:
                eps = self.eps_tag() if kind == "dp" else ""
                out.update(self.gap(synth, self.scores[kind]).keys(f"auroc_gap_{kind}_{self.tag('synth')}{eps}_mean"))
        if "augment" in self.scores:
            real, aug = self.scores["real"], self.scores["augment"]
            out.update(Estimate.of(*real.mean(self.rare)).keys(f"auroc_{self.tag('real')}_rare_mean"))
            out.update(self.gap(aug, real, self.rare).keys(f"auroc_gap_real_{self.tag('augment')}_rare_mean"))
        return out

    @staticmethod
    def gap(a: Scores, b: Scores, labels: Sequence[str] | None = None) -> Estimate:
        """Mean AUROC of ``a`` minus that of ``b`` over ``labels``, with a paired interval."""
        (va, ra), (vb, rb) = a.mean(labels), b.mean(labels)
        return Estimate.of(va - vb, ra - rb)

    def protocol(self) -> dict[str, object]:
        out: dict[str, object] = {"utility_labels": self.labels, "utility_labels_not_scored": self.skipped,
                                  "utility_rare_labels": self.rare,
                                  "utility_augment_synthetic_films": self.augment_films}
        if self.dp is not None:
            out["utility_dp"] = self.dp.as_dict()
        return out


def utility_audit(fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray,
                  real_patients: np.ndarray, names: Sequence[str], train: np.ndarray | None = None,
                  train_labels: np.ndarray | None = None, train_patients: np.ndarray | None = None,
                  settings: UtilitySettings = UtilitySettings(), seed: int = 0) -> UtilityResult:
    """TSTR and its references (see the module docstring). Without ``train``/``train_labels`` only the
    synthetic-trained classifier is scored; without ``train_patients`` the DP baseline is left out."""
    names = [key_name(n) for n in names]
    if len(set(names)) != len(names):
        raise UserError(f"label names {names} repeat after lower-casing; give each label column its own name")
    reserved = [n for n in names if n in ("mean", "rare_mean") or n.endswith(("_lo", "_hi"))]
    if reserved:
        raise UserError(f"label name {reserved[0]!r} would read as a summary key; rename that label column")
    real_labels = np.asarray(real_labels, np.float64)
    cols, skipped = scorable(real_labels, real_patients, names, settings.min_patients)
    if not cols:
        raise UserError(f"no label has {settings.min_patients} positive and {settings.min_patients} negative "
                        "evaluation patients; give more evaluation patients or lower the minimum")
    result = UtilityResult(int(real.shape[-1]), [names[c] for c in cols], skipped, [])
    weights = bootstrap_weights(real_patients, settings.bootstrap, seed)
    cs = settings.classifier

    def score(net: SmallCNN, films: int, columns: Sequence[int], on: np.ndarray = real, truth: np.ndarray = real_labels,
              resample: np.ndarray = weights) -> Scores:
        p = predict(net, on)
        per_label, reps = {}, []
        for c in columns:
            known = np.isfinite(truth[:, c])
            y, s = truth[known, c], p[known, c]
            reps.append(weighted_auroc(s, y, resample[:, known]))
            per_label[names[c]] = Estimate.of(auroc(s, y), reps[-1])
        return Scores(films, per_label, np.stack(reps, axis=1))

    result.scores["synth"] = score(train_classifier(fake, fake_labels, cs, seed), len(fake), cols)
    if train is None or train_labels is None:
        return result
    train_labels = np.asarray(train_labels, np.float64)
    width = train_labels.shape[1]
    real_net, _ = cached_network(
        cache_key("utility-real", cs, seed, train, train_labels),
        lambda: seeded(seed, lambda: SmallCNN(width, cs.width)),
        lambda: (train_classifier(train, train_labels, cs, seed), {}))
    result.scores["real"] = score(real_net, len(train), cols)
    fake_labels = np.asarray(fake_labels, np.float64)
    drawn, _ = scorable(fake_labels, np.arange(len(fake)), names, settings.min_patients)
    drawn = [c for c in cols if c in drawn]
    if drawn:
        result.scores["fidelity"] = score(real_net, len(fake), drawn, fake, fake_labels,
                                          bootstrap_weights(np.arange(len(fake)), settings.bootstrap, seed))

    if train_patients is not None:
        ds = settings.dp_classifier
        dp_net, meta = cached_network(
            cache_key("utility-dp", ds, seed, train, train_labels, np.asarray(train_patients, dtype=str),
                      epsilon=settings.epsilon, delta=settings.delta, clip=settings.max_grad_norm),
            lambda: seeded(seed, lambda: SmallCNN(width, ds.width)),
            lambda: _private(train, train_labels, train_patients, settings, seed))
        result.dp = PrivateTraining(**meta)
        result.scores["dp"] = score(dp_net, len(train), cols)

    known = np.isfinite(train_labels)
    prevalence = np.where(known, train_labels, 0).sum(0) / np.maximum(known.sum(0), 1)
    rare = [c for c in cols if known[:, c].any() and prevalence[c] < settings.rare_prevalence]
    result.rare = [names[c] for c in rare]
    extra = np.flatnonzero((fake_labels[:, rare] == 1).any(axis=1)) if rare else np.zeros(0, np.int64)
    if len(extra):
        result.augment_films = len(extra)
        net = train_classifier(np.concatenate([train, fake[extra]]),
                               np.concatenate([train_labels, fake_labels[extra]]), cs, seed)
        result.scores["augment"] = score(net, len(train), rare)
    elif rare:
        log.info("utility: no synthetic film carries a rare finding (%s); augmentation not scored", result.rare)
    return result


def _private(train: np.ndarray, labels: np.ndarray, patients: np.ndarray, settings: UtilitySettings, seed: int
             ) -> tuple[SmallCNN, dict]:
    net, info = train_private_classifier(train, labels, patients, settings.dp_classifier, settings.epsilon, seed,
                                         settings.delta, settings.max_grad_norm)
    return net, info.as_dict()
