"""A private release of a hospital's label frequencies: what a conditional GAN under DP draws generated labels from.

Why
---
A conditional generator is trained on generated images whose labels follow some distribution; drawing them from
the training data's own label frequencies keeps rare findings as rare as they are, but those frequencies are a
statistic of the patients. Under DP they are released once, with the Gaussian mechanism, before training, and
everything after (the labels of every generated batch) is post-processing. The alternative that costs nothing is a
public table (``train.label_source = "public"``: the NIH release's metadata).

The release (:func:`release_label_frequencies`)
-----------------------------------------------
- Each privacy unit (patient, or image) contributes the mean of its images' label vectors
  (:mod:`medsyngan.data.labels`): for a one-hot group a probability vector, for the findings each one's share of
  the patient's films.
- That contribution is clipped to L2 norm :func:`clip_bound` = √(g + 2) for g one-hot groups and the findings
  (√g without findings): room for one value per group and two findings; a patient with more is scaled down.
- The sum over units gets N(0, (σ · bound)²) per component; divided by the number of units (public, as DP-SGD's
  q = batch / units already treats it) it gives each component's frequency. Post-processing: a one-hot group's
  frequencies are made non-negative and scaled down to sum to at most 1 (the rest is 'unknown'), each finding's
  frequency is clamped to [0, 1]. The result is a :class:`~medsyngan.data.labels.MarginalLabels`.
- Adding or removing a unit moves the sum by at most the bound: one Gaussian mechanism with noise multiplier σ,
  composed with the mean-image release (if any) into one one-off accountant entry at q = 1
  (:func:`~medsyngan.privacy.accounting.combined_noise`), calibrated for by the plan
  (:func:`~medsyngan.privacy.accounting.plan_dp`) and charged to the accountant, ledger written, before the
  release is computed (:class:`~medsyngan.privacy.session.DPSession`).
- It happens once per hospital and run; the released frequencies are kept in the hospital's DP state, so later
  rounds and a resumed run reuse them and spend nothing more; a release made again (a hospital restored past it)
  is charged again, with its own noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsyngan.config import Config, PrivacySection
from medsyngan.data.labels import LabelLayout, MarginalLabels, distribution_from_json
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import combined_noise
from medsyngan.privacy.one_off import OneOffRelease


def label_release_planned(cfg: Config) -> bool:
    """Whether a private run of ``cfg`` releases its hospitals' label frequencies (a conditional model that draws
    generated labels from its training data)."""
    return bool(cfg.model.condition) and cfg.train.label_source == "data"


def one_off_noise(privacy: PrivacySection, release_labels: bool) -> float:
    """σ of the one accountant entry that stands for a hospital's one-off releases: the mean image (when
    privacy.mean_image_size is set) and the label frequencies (when ``release_labels``); 0 for none."""
    return combined_noise(privacy.release_noise, privacy.label_noise if release_labels else 0.0)


def clip_bound(layout: LabelLayout) -> float:
    """L2 bound of one unit's contribution: √(one-hot groups + 2 when the findings are included)."""
    return math.sqrt(len(layout.one_hot_groups) + (2 if "findings" in layout.groups else 0))


def unit_label_means(labels: np.ndarray, patients: Sequence[str] | np.ndarray | None) -> torch.Tensor:
    """One mean label vector per privacy unit (patient when ids are given, else image), (units, dim)."""
    x = torch.from_numpy(np.asarray(labels, np.float32))
    if patients is None:
        return x
    _, inverse = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    index = torch.from_numpy(inverse)
    sums = torch.zeros(int(index.max()) + 1, x.shape[1]).index_add_(0, index, x)
    return sums / torch.bincount(index).float()[:, None]


def release_label_frequencies(labels: np.ndarray, patients: Sequence[str] | np.ndarray | None, layout: LabelLayout,
                              noise_multiplier: float, generator: torch.Generator) -> MarginalLabels:
    """The hospital's private label frequencies (see the module docstring)."""
    means = unit_label_means(labels, patients)
    bound = clip_bound(layout)
    norms = means.norm(dim=1, keepdim=True)
    clipped = means * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
    noise = torch.randn(layout.dim, generator=generator, dtype=torch.float64) * (noise_multiplier * bound)
    freq = ((clipped.double().sum(0) + noise) / len(means)).numpy()
    for group, sl in layout.slices.items():
        part = np.clip(freq[sl], 0.0, None)
        if group == "findings":
            part = np.minimum(part, 1.0)
        elif part.sum() > 1.0:
            part = part / part.sum()
        freq[sl] = part
    return MarginalLabels(layout, freq)


class LabelRelease(OneOffRelease[MarginalLabels]):
    """The release of one hospital (module docstring): made at the first call of :meth:`distribution`, or read back
    from the DP state with :meth:`load_state_dict`."""

    what = "label release"

    def __init__(self, labels: np.ndarray, patients: Sequence[str] | np.ndarray | None, layout: LabelLayout,
                 noise_multiplier: float):
        super().__init__()
        self.labels, self.patients, self.layout = labels, patients, layout
        self.noise_multiplier = float(noise_multiplier)

    def distribution(self) -> MarginalLabels:
        return self._release_once(lambda noise: release_label_frequencies(
            self.labels, self.patients, self.layout, self.noise_multiplier, noise))

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.released is None else self.released.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        released = distribution_from_json(state)
        if not isinstance(released, MarginalLabels) or released.layout != self.layout:
            raise UserError("the DP state holds label frequencies of another layout than model.condition; resume "
                            "with the run's own configuration")
        self.released = released
