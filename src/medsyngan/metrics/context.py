"""What a registered metric is given and what it gives back.

A metric (see :mod:`medsyngan.metrics.registry`) is a function of one :class:`MetricContext` — the image sets,
their patient ids and per-image labels, the feature network with its features computed once per set, the
networks when given, ε/δ, seed and options — returning a :class:`MetricResult`: protocol-named values, the
protocol entries it used, and a typed detail object when the report shows more than numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.metrics.classifier import ClassifierSettings
from medsyngan.metrics.features import FeatureExtractor, cached_features, extract, make_extractor
from medsyngan.metrics.images import check_same_resolution
from medsyngan.metrics.private_classifier import DP_CLASSIFIER
from medsyngan.metrics.reidentification import FALSE_MATCH_RATE, WORST, VerifierSettings

SETS = ("fake", "real", "train")


class NotApplicable(UserError):
    """The inputs do not allow this metric (e.g. no training set); not an error of the evaluation."""


def count_tag(n: int) -> str:
    """Sample count in a metric name: 5000 → '5k', 690 → '690'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def protocol_tag(count: int, resolution: int, network: str) -> str:
    """The '<count>_<resolution>_<network>' part of a metric key, e.g. '5k_64_random'."""
    return f"{count_tag(count)}_{resolution}_{network}"


class Features:
    """The feature network and the features of each set, each computed once and only when a metric asks.

    The network is built on first use; when it cannot be (missing weights, bad TorchScript file) the same
    one-line error is raised to every metric that asks, and :meth:`available` says False. Features of real
    sets are cached on disk by a hash of pixels and network (:func:`cached_features`); synthetic ones change
    with every snapshot and are not.
    """

    def __init__(self, extractor: str | FeatureExtractor = "random", device: torch.device | str = "cpu",
                 batch_size: int = 64):
        self._spec, self.device, self.batch_size = extractor, device, batch_size
        self._extractor = extractor if isinstance(extractor, FeatureExtractor) else None
        self._error: UserError | None = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            if self._error is not None:
                raise self._error
            try:
                self._extractor = make_extractor(str(self._spec), self.device, seed=0)
            except UserError as exc:
                self._error = exc
                raise
        return self._extractor

    @property
    def tag(self) -> str:
        return self.extractor.tag

    def available(self) -> bool:
        try:
            self.extractor
        except UserError:
            return False
        return True

    def of(self, name: str, images: np.ndarray) -> np.ndarray:
        """Features [N, D] of the set called ``name`` (one of :data:`SETS`)."""
        if name not in self._cache:
            run = extract if name == "fake" else cached_features
            self._cache[name] = run(self.extractor, images, self.batch_size, f"features: {name}")
        return self._cache[name]

    def for_other_synthetic_set(self) -> Features:
        """The same network and real-set features, for evaluating another synthetic set (snapshots)."""
        other = Features(self.extractor, self.device, self.batch_size)
        other._cache = {k: v for k, v in self._cache.items() if k != "fake"}
        return other


@dataclass
class MetricOptions:
    """Sample sizes and thresholds of the metrics; the defaults are the published protocols'."""

    nn_threshold: float = 0.95  # SSIM above which a synthetic image counts as a near-copy
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    msssim_pairs: int = 1000
    ppl_samples: int = 2000
    batch_size: int = 64
    bootstrap: int = 1000  # patient resamples behind every AUROC interval
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)  # utility's classifiers
    dp_classifier: ClassifierSettings = DP_CLASSIFIER  # utility's DP-SGD baseline
    utility_min_patients: int = 5  # positive and negative evaluation patients a label needs to be scored
    utility_rare_prevalence: float = 0.10  # a finding on fewer of the training films is rare
    utility_epsilon: float | None = None  # the DP classifier's ε; None: the run's ε, else 1
    verifier: VerifierSettings = field(default_factory=VerifierSettings)
    reid_false_match_rate: float = FALSE_MATCH_RATE
    reid_worst: int = WORST  # worst-case synthetic films kept for the report


@dataclass
class MetricContext:
    """The inputs of one evaluation. Images are uint8 [N, S, S] at one resolution.

    ``fake``: synthetic images; ``real``: real images the model did not train on (the reference distribution
    and the privacy audit's non-members); ``train``: the training images (memorization and membership
    references). ``*_patients``: a patient id per image; ``*_labels``: a label vector per image ([N, C] binary,
    NaN = unknown; :func:`medsyngan.metrics.utility.binary_targets` builds them), for metrics that train
    classifiers on the sets, with ``label_names`` naming the C columns. ``verifier_images`` /
    ``verifier_patients``: public films with patient ids, none of a training patient, for the re-identification
    verifier. ``reference_fake``: samples of a reference generator of the same architecture trained on public
    data only, attacked beside ``fake`` so that distribution shift is not read as leakage. A metric names the
    fields it cannot do without in its registration (``needs``); a field left None makes it not applicable.
    ``features`` defaults to the random network on the CPU.
    """

    fake: np.ndarray
    real: np.ndarray
    train: np.ndarray | None = None
    real_patients: np.ndarray | None = None
    train_patients: np.ndarray | None = None
    fake_labels: np.ndarray | None = None
    real_labels: np.ndarray | None = None
    train_labels: np.ndarray | None = None
    label_names: tuple[str, ...] | None = None
    verifier_images: np.ndarray | None = None
    verifier_patients: np.ndarray | None = None
    reference_fake: np.ndarray | None = None
    features: Features = field(default_factory=Features)
    generator: torch.nn.Module | None = None
    discriminator: torch.nn.Module | None = None
    epsilon: float | None = None
    delta: float | None = None
    seed: int = 0
    device: torch.device | str = "cpu"
    options: MetricOptions = field(default_factory=MetricOptions)

    def __post_init__(self) -> None:
        for role, images in (("synthetic", self.fake), ("real", self.real)):
            if len(images) == 0:
                raise UserError(f"the {role} set is empty; give at least one image")
        check_same_resolution(synthetic=self.fake, real=self.real, train=self.train, verifier=self.verifier_images,
                              reference=self.reference_fake)
        for name in SETS:
            images, labels = getattr(self, name), getattr(self, f"{name}_labels")
            if labels is not None and (images is None or len(labels) != len(images)):
                have = 0 if images is None else len(images)
                raise UserError(f"{name}_labels has {len(labels)} rows for {have} {name} images; give one label "
                                "vector per image")
            if labels is not None and self.label_names is not None and np.shape(labels)[-1] != len(self.label_names):
                raise UserError(f"{name}_labels has {np.shape(labels)[-1]} columns for {len(self.label_names)} "
                                "label names; give one name per label column")
        if (self.verifier_images is None) != (self.verifier_patients is None) or (
                self.verifier_images is not None and len(self.verifier_images) != len(self.verifier_patients)):
            raise UserError("give the verifier's public films together with one patient id per film")

    @property
    def resolution(self) -> int:
        return int(self.fake.shape[-1])

    def feature_tag(self) -> str:
        """'<count>_<resolution>_<network>' of the feature metrics on this synthetic set."""
        return protocol_tag(len(self.fake), self.resolution, self.features.tag)

    def feats(self, name: str) -> np.ndarray:
        """Features of the set called ``name`` (fake, real or train) under :attr:`features`."""
        images = getattr(self, name)
        if images is None:
            raise NotApplicable(f"needs the {name} images")
        return self.features.of(name, images)

    def missing(self, need: str) -> str | None:
        """Why the field ``need`` leaves a metric not applicable, or None when it is given."""
        if getattr(self, need) is not None:
            return None
        return f"needs {NEED_HINTS.get(need, need.replace('_', ' '))}"


NEED_HINTS = {
    "train": "the training images (--train)",
    "generator": "a generator (--run or --checkpoint), not a folder of images",
    "fake_labels": "the labels of the synthetic films (a conditional generator's requested labels)",
    "real_labels": "the labels of the real evaluation films",
    "label_names": "the names of the label columns",
    "real_patients": "a patient id per real evaluation film",
    "train_patients": "a patient id per training film",
    "verifier_images": "public films with patient ids for the re-identification verifier (e.g. the COVID-19 CXR set)",
}


@dataclass
class MetricResult:
    """``values``: {protocol-named key: value}; ``protocol``: how they were measured (feature network, patient
    overlap), merged into the evaluation's protocol; ``detail``: what the report shows beyond numbers."""

    values: dict[str, float]
    protocol: dict[str, Any] = field(default_factory=dict)
    detail: Any = None
