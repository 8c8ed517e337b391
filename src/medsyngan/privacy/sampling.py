"""Poisson sampling of privacy units (patients, or images when no patient ids exist) for DP-SGD.

Each call draws one batch: every unit joins independently with probability q = expected batch / units, and each
unit that joins contributes ONE of its images, chosen uniformly. One patient then changes at most one row of one
batch per step, so the subsampled Gaussian mechanism is analysed at rate q with the patient as the unit — the
accountant's sampling rate is the patient rate, whatever the number of images per patient.

Batches are variable in size, possibly empty; an empty batch is still a private step (noise only) and still counts.

With ``labels`` (one float vector per image, for a conditional model) a batch is (images, labels) of the same rows:
a sampled patient's image comes with its own labels, which enter D only inside that sample's clipped loss.

The random stream of batch t is derived from (seed, t) alone, so the sampler's whole state is (seed, draws) and a
resumed run draws exactly the batches the uninterrupted one would have. The seed must stay secret to the hospital:
amplification by subsampling assumes the adversary does not know who was sampled (see ``session.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsyngan.config import AugmentSection
from medsyngan.data.augment import augment_batch, is_active
from medsyngan.errors import UserError

UNITS = ("patient", "image")


def _stream(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, purpose, index])))


class PoissonUnitSampler:
    """Callable real-batch source for ``GANTrainer.train_step``: (B, 1, S, S) float32 in [-1, 1], B random (with
    ``labels``: the pair of that batch and its (B, c_dim) labels).

    Args:
        images: (N, S, S) uint8 training images.
        patients: patient id per image (None: no ids), used when ``unit == 'patient'``.
        expected_batch: expected batch size; q = expected_batch / units.
        unit: 'patient' or 'image' (see :func:`resolve_unit`).
        seed: secret seed of the sampling stream.
        device: where batches go.
        augment: optional data augmentation (data-independent randomness, applied per image, so it is part of
            the per-sample computation and costs no privacy).
        labels: (N, c_dim) label vectors of the images, or None.
    """

    def __init__(self, images: np.ndarray, patients: Sequence[str] | np.ndarray | None, expected_batch: int,
                 unit: str, seed: int, device: torch.device | str = "cpu", augment: AugmentSection | None = None,
                 labels: np.ndarray | None = None):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, S, S], got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise UserError("the hospital's training set is empty; DP-SGD needs at least one image")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        n, self.size = images.shape[0], images.shape[1]
        self._data = torch.from_numpy(np.ascontiguousarray(images).reshape(n, -1))
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} label vectors for {n} images")
        self._labels = None if labels is None else torch.from_numpy(np.asarray(labels, np.float32).reshape(n, -1))
        if unit == "patient":
            if patients is None or len(patients) != n:
                raise ValueError("patient-level sampling needs one patient id per image")
            _, codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
            order = np.argsort(codes, kind="stable")
            counts = np.bincount(codes)
            self._order = order
            self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self._counts = counts
        else:
            self._order = np.arange(n)
            self._starts = np.arange(n)
            self._counts = np.ones(n, dtype=np.int64)
        self.unit = unit
        self.units = len(self._counts)
        self.expected_batch = int(expected_batch)
        self.sample_rate = self.expected_batch / self.units
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sampling rate {self.expected_batch}/{self.units} is outside (0, 1]")
        self.seed = int(seed)
        self.draws = 0
        self.device = torch.device(device)
        self.augment = augment if is_active(augment) else None

    def indices(self, t: int) -> np.ndarray:
        """Image rows of batch t: units sampled with probability q, one uniformly chosen image of each."""
        rng = _stream(self.seed, t, 0)
        chosen = np.flatnonzero(rng.random(self.units) < self.sample_rate)
        pick = np.floor(rng.random(len(chosen)) * self._counts[chosen]).astype(np.int64)
        return self._order[self._starts[chosen] + pick]

    def __call__(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.indices(self.draws))
        t = self.draws
        self.draws += 1
        rows = torch.index_select(self._data, 0, idx)
        x = rows.to(self.device).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0).view(-1, 1, self.size, self.size)
        if self.augment is not None and len(x):
            gen = torch.Generator().manual_seed(int(_stream(self.seed, t, 1).integers(2**63)))
            x = augment_batch(x, self.augment, gen)
        if self._labels is None:
            return x
        return x, torch.index_select(self._labels, 0, idx).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws, "units": self.units, "unit": self.unit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["units"]) != self.units or state["unit"] != self.unit:
            raise UserError(
                f"saved DP sampler state is for {state['units']} {state['unit']}s, this hospital has {self.units} "
                f"{self.unit}s; resume with the same data partition"
            )
        self.seed, self.draws = int(state["seed"]), int(state["draws"])
