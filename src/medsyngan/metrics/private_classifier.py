"""The :class:`~medsyngan.metrics.classifier.SmallCNN` trained on real films with patient-level DP-SGD.

The baseline a DP generator must beat (Tayebi Arasteh et al. 2024): if a classifier trained directly on the
hospital's films under the same ε scores as well on real patients as one trained on the generator's films, the
generator added nothing but cost. The training mirrors the product's DP-SGD on the discriminator:

- **Poisson sampling over patients** (:class:`~medsyngan.privacy.sampling.PoissonUnitSampler`): each step every
  patient joins with probability q = expected batch / patients and brings one of its films, so one patient
  changes at most one row of one batch — the accountant's unit is the patient.
- **Per-sample clipping and Gaussian noise**: Opacus' ``GradSampleModule`` gives each film's gradient; each is
  clipped to ``max_grad_norm`` C, they are summed, N(0, σ²C²) is added per coordinate, and the sum is divided by
  the expected batch (an empty batch is a step of noise only and is still counted).
- **σ calibrated before training** by :func:`~medsyngan.privacy.accounting.plan_dp` so that ε after the planned
  steps stays within the target; the accountant then reports the ε actually spent (:class:`PrivateTraining`).

The noise and sampling streams are seeded (a measurement must be reproducible); this classifier is scored and
discarded, never released, so its guarantee is what it would have had as a released model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch

from medsyngan.errors import UserError
from medsyngan.metrics.classifier import (ClassifierSettings, SmallCNN, as_targets, fixed_threads, masked_bce,
                                          random_shift, seeded, to_input)
from medsyngan.privacy.accounting import RELATION as ACCOUNTANT_RELATION
from medsyngan.privacy.accounting import DPPlan, plan_dp
from medsyngan.privacy.sampling import PoissonUnitSampler

if TYPE_CHECKING:
    from opacus import GradSampleModule

# ε is stated for the product's neighbouring relation (replace one patient by another, the relation that protects a
# patient when patient counts and batch sizes are public); it is the accountant's, never restated here.
RELATION = f"{ACCOUNTANT_RELATION} patient"


def private_plan(patients: int, expected_batch: int, steps: int, epsilon: float, delta: float) -> DPPlan:
    """σ for ``steps`` Poisson-sampled steps over ``patients`` at the target ε (δ = 0: the product's default)."""
    return plan_dp(patients, expected_batch, steps, epsilon, delta, unit="patient",
                   where="DP classifier baseline")


def spent_epsilon(plan: DPPlan, steps: int) -> float:
    """ε the accountant reports after ``steps`` steps of ``plan``."""
    accountant = plan.accountant()
    accountant.step(steps)
    return accountant.epsilon()["reported"]


# DP-SGD learns with larger expected batches (the noise is averaged over more patients) and larger steps (the
# clipped signal is small); on the NIH sample these settings gave the DP baseline its best mean AUROC at ε = 10.
DP_CLASSIFIER = ClassifierSettings(batch_size=64, lr=1e-2)


@dataclass(frozen=True)
class PrivateTraining:
    """What the DP baseline spent and how: ε (≤ target), δ, σ, q, steps over how many patients, clip, relation."""

    target_epsilon: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    patients: int
    max_grad_norm: float
    relation: str = RELATION

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def clipped_gradient_sum(module: GradSampleModule, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                         clip: float) -> list[torch.Tensor]:
    """Σ over the films of ``x`` of each film's loss gradient scaled to norm ≤ ``clip`` (zeros for no film)."""
    module.zero_grad(set_to_none=True)
    if not len(x):
        return [torch.zeros_like(p) for p in params]
    with warnings.catch_warnings():
        # Opacus' hooks sit on layers whose inputs need no gradient, which torch warns about at every backward
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        masked_bce(module(x), y).sum().backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", factor, p.grad_sample) for p in params]


@fixed_threads
def train_private_classifier(images_u8: np.ndarray, targets: np.ndarray, patients: np.ndarray,
                             settings: ClassifierSettings, epsilon: float, seed: int, delta: float = 0.0,
                             max_grad_norm: float = 1.0) -> tuple[SmallCNN, PrivateTraining]:
    """A :class:`SmallCNN` trained with patient-level DP-SGD at target ``epsilon``; ``settings.batch_size`` is the
    expected number of patients per step (capped at the patient count), ``settings.epochs`` passes over patients."""
    if patients is None or len(patients) != len(images_u8):
        raise UserError("the DP classifier baseline needs one patient id per training film")
    units = len(np.unique(np.asarray(patients, dtype=str)))
    batch = min(settings.batch_size, units)
    steps = settings.steps(units)
    plan = private_plan(units, batch, steps, epsilon, delta)
    sigma, clip = plan.noise_multiplier, float(max_grad_norm)

    from opacus import GradSampleModule  # loaded when a DP classifier is trained, not with the metrics

    x, y = to_input(images_u8), as_targets(targets)
    net = seeded(seed, lambda: SmallCNN(y.shape[1], settings.width))
    module = GradSampleModule(net, loss_reduction="sum")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sampler = PoissonUnitSampler(np.ascontiguousarray(images_u8), np.asarray(patients, dtype=str), batch,
                                 "patient", seed)
    augment_gen, noise_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    module.train()
    for t in range(steps):
        idx = torch.from_numpy(sampler.indices(t))
        clipped = clipped_gradient_sum(module, params, random_shift(x[idx], settings.shift, augment_gen), y[idx],
                                       clip)
        for p, g in zip(params, clipped):
            p.grad = (g + torch.normal(0.0, sigma * clip, p.shape, generator=noise_gen)) / batch
        opt.step()
    module.to_standard_module()
    info = PrivateTraining(float(epsilon), spent_epsilon(plan, steps), plan.delta, sigma, plan.sample_rate, steps,
                           units, clip)
    return net.eval(), info
