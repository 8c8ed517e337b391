"""A private mean image: one Gaussian release per hospital, and the generator-loss term that matches it.

Why
---
DP-SGD on a discriminator spends its budget over hundreds of noisy steps on a high-dimensional gradient. What a
generator pretrained on public data gets most wrong about real films is low-order: where the film is bright or
dark on average (lung fields, mediastinum, the borders). A k×k mean image is k² numbers: released ONCE with the
Gaussian mechanism it costs a small, fixed part of the budget, where a D head needs hundreds of noisy steps to
learn the same (after DP-MERF, Harder et al. 2021, and DP-MEPF, Harder et al. 2023: release low-order moments under DP,
then fit the generator to them at no further privacy cost).

The release (:func:`release_mean_image`)
----------------------------------------
- Each privacy unit (patient, or image) contributes the k×k average-pooled mean of its images on the [-1, 1]
  scale, minus a public reference (the generator's own k×k mean before training: deviations from it are smaller
  than the images themselves, so the same clipping norm cuts less).
- The deviation is clipped to L2 norm ``clip · k`` (``clip`` is an RMS per low-resolution pixel, so the setting
  does not depend on k); the sum over units gets N(0, (σ · clip · k)²) per coordinate; dividing by the number of
  units (treated as public, as DP-SGD's sampling rate q = batch / units already is) and adding the reference back
  gives the target.
- Replacing one unit by another moves the sum by at most 2 · ``clip · k``: one Gaussian mechanism with noise
  multiplier σ under the replace-one relation (``accounting``: dp-accounting's REPLACE shift of ± clip · k), i.e. one
  accountant entry (σ, q = 1, 1 step) composed with the DP-SGD steps, and paid from the same budget
  (``accounting.plan_dp``).
- It happens once per hospital and run; the target is kept in the hospital's ledger, so later rounds and a
  resumed run reuse it and spend nothing more. A release that began and was lost (a crash before the target
  reached the ledger) is never repeated with the same noise: the next attempt draws its own and is charged again.

The anchor (:class:`MeanImageRelease` as a loss term)
----------------------------------------------------
A term of the generator loss, post-processing of the release: weight · 2 (m̄ − t) · m, where m is the k×k mean of
the generated batch and m̄ a running average of it (detached). Its gradient is that of ‖E[m] − t‖². The squared
batch mean ‖m − t‖² would also reward a generator for shrinking its own variety (its expectation includes the
batch variance); here the current batch enters m̄ with weight 1 − ``RUNNING_MOMENTUM``, so that reward is a tenth
as large. The term is linear in m, so a BatchNorm generator cannot lower it by correlating a batch's samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medsyngan.errors import UserError
from medsyngan.privacy.one_off import OneOffRelease

#: How many generated images the public reference mean is taken over.
REFERENCE_SAMPLES = 256
#: Running average of the generated batch's mean image: about the last ten generator steps.
RUNNING_MOMENTUM = 0.9


def lowres_mean(images: Tensor, size: int) -> Tensor:
    """The k×k average-pooled mean of a batch (B, 1, S, S) → (k, k)."""
    return F.adaptive_avg_pool2d(images.float(), size).mean(dim=(0, 1))


def unit_means(images: np.ndarray, patients: Sequence[str] | np.ndarray | None, size: int) -> Tensor:
    """One k×k mean image per privacy unit (patient when ids are given, else image), on the [-1, 1] scale."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0).unsqueeze(1)
    pooled = F.adaptive_avg_pool2d(x, size)[:, 0]
    if patients is None:
        return pooled
    _, inverse = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    index = torch.from_numpy(inverse)
    sums = torch.zeros(int(index.max()) + 1, size, size).index_add_(0, index, pooled)
    counts = torch.bincount(index).float()
    return sums / counts[:, None, None]


def release_mean_image(images: np.ndarray, patients: Sequence[str] | np.ndarray | None, size: int, clip: float,
                       noise_multiplier: float, reference: Tensor, generator: torch.Generator) -> Tensor:
    """The hospital's private k×k mean image (see the module docstring); ``reference`` must be public."""
    if size < 1 or size > images.shape[-1]:
        raise UserError(f"privacy.mean_image_size = {size} must lie between 1 and the image side {images.shape[-1]}")
    means = unit_means(images, patients, size)
    deviation = (means - reference.cpu()).flatten(1)
    bound = clip * size
    norms = deviation.norm(dim=1, keepdim=True)
    clipped = deviation * torch.clamp(bound / norms.clamp_min(1e-12), max=1.0)
    noise = torch.randn(size * size, generator=generator) * (noise_multiplier * bound)
    return (clipped.sum(0) + noise).div(len(means)).view(size, size) + reference.cpu()


@torch.no_grad()
def generator_mean(G: torch.nn.Module, size: int, seed: int = 0, labels: Tensor | None = None) -> Tensor:
    """The k×k mean of ``REFERENCE_SAMPLES`` images of G (in eval mode, so BatchNorm statistics do not move);
    ``labels`` (REFERENCE_SAMPLES, c_dim) for a conditional G."""
    device = next(G.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn(REFERENCE_SAMPLES, G.z_dim, generator=gen, device=device)
    was_training = G.training
    G.eval()
    try:
        return lowres_mean(G(z) if labels is None else G(z, c=labels.to(device)), size).cpu()
    finally:
        G.train(was_training)


class MeanImageRelease(OneOffRelease[Tensor]):
    """The release and the generator-loss term that matches it (module docstring), as ``trainer.g_extra_loss``.

    The release happens at the first generator step, not when the session is built: only then does G hold the
    weights it trains from (a federated hospital receives the global model with its first round), and its mean
    image is the reference. ``released`` is the target once it exists.
    """

    what = "mean-image release"

    def __init__(self, images: np.ndarray, patients: Sequence[str] | np.ndarray | None, size: int, clip: float,
                 noise_multiplier: float, weight: float, generator: torch.nn.Module,
                 reference_labels: Callable[[int], Tensor] | None = None):
        super().__init__()
        self.images, self.patients, self.generator = images, patients, generator
        self.reference_labels = reference_labels  # n → labels of the reference images, for a conditional G
        self.size, self.clip = int(size), float(clip)
        self.noise_multiplier, self.weight = float(noise_multiplier), float(weight)
        self.running: Tensor | None = None

    def release(self) -> Tensor:
        return self._release_once(self._compute)

    def _compute(self, noise: torch.Generator) -> Tensor:
        labels = self.reference_labels(REFERENCE_SAMPLES) if self.reference_labels is not None else None
        reference = generator_mean(self.generator, self.size, labels=labels)
        return release_mean_image(self.images, self.patients, self.size, self.clip, self.noise_multiplier,
                                  reference, noise)

    def __call__(self, fake: Tensor) -> tuple[Tensor, Tensor]:
        """(loss term, squared gap ‖m̄ − t‖²) for a generated batch (B, 1, S, S)."""
        target = self.release().to(fake.device)
        mean = lowres_mean(fake, self.size)
        detached = mean.detach()
        self.running = detached if self.running is None else torch.lerp(detached, self.running, RUNNING_MOMENTUM)
        gap = self.running - target
        return self.weight * 2.0 * (gap * mean).sum(), gap.square().sum()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.released is None else {"size": self.size, "target": self.released.flatten().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["size"]) != self.size:
            raise UserError(f"the DP state holds a {state['size']}×{state['size']} mean image but "
                            f"privacy.mean_image_size is {self.size}; resume with the run's own configuration")
        self.released = torch.tensor(state["target"], dtype=torch.float32).view(self.size, self.size)
