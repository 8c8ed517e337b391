"""The public entry point of patient-level DP-SGD on the discriminator: :func:`enable_dp`.

::

    steps = planned_private_steps(cfg)                       # medsyngan.privacy.accounting: all rounds of the run
    session = enable_dp(trainer, images, patients, cfg.privacy, batch_size=cfg.train.batch_size,
                        planned_steps=steps, augment=cfg.data.augment)   # validates D, calibrates σ, installs
    for _ in range(n):
        stats = trainer.train_step(session.next_real)        # Poisson batch of patients → one private D step each
        row = {**stats, **session.metrics()}                 # epsilon (replace-one), epsilon_add_remove
    persistent["dp"] = session.state_dict()                  # JSON; a checkpoint's, or a hospital's ledger
    # next round / resume: no recalibration, no reset
    session = enable_dp(trainer, images, patients, cfg.privacy, batch_size=cfg.train.batch_size,
                        planned_steps=steps, augment=cfg.data.augment, state=persistent["dp"])

The session is a :class:`~medsyngan.privacy.session.DPSession` (re-exported here); what it makes private and why
is in :mod:`medsyngan.privacy.session`, the per-sample gradient engines are in :mod:`medsyngan.privacy.engines`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsyngan.config import AugmentSection, PrivacySection
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import PrivacyAccountant, epsilon_of, plan_dp, resolve_unit
from medsyngan.privacy.engines import validate_discriminator
from medsyngan.privacy.moments import MeanImageRelease
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.privacy.session import DPSession, PrivateDiscriminatorUpdate
from medsyngan.training.step import GANTrainer

__all__ = ["DPSession", "enable_dp", "privacy_unit"]


def privacy_unit(requested: str, images: int, patients: Sequence[str] | np.ndarray | None) -> tuple[str, int]:
    """(unit, number of units): patient-level when ids exist and group images, else image-level."""
    has_ids = patients is not None and len(patients) == images and all(str(x) for x in patients)
    if not has_ids:
        if requested == "patient":
            raise UserError(
                "patient-level DP but the dataset has no patient ids; set privacy.unit=image or auto (in a "
                "federation also the hospitals' policy: hospital.unit=image)"
            )
        return "image", images
    n_patients = len(np.unique(np.asarray(patients, dtype=str)))
    unit = resolve_unit(requested, n_patients, images)
    return unit, n_patients if unit == "patient" else images


def enable_dp(trainer: GANTrainer, images: np.ndarray, patients: Sequence[str] | np.ndarray | None,
              privacy: PrivacySection, *, batch_size: int, planned_steps: int, augment: AugmentSection | None = None,
              state: dict[str, Any] | None = None, seed: int | None = None, engine: str = "auto",
              min_noise: float = 0.0) -> DPSession:
    """Make ``trainer``'s discriminator update DP-SGD and return the session.

    ``images``: (N, S, S) uint8 of this hospital; ``patients``: patient id per image or None. ``batch_size`` is the
    expected Poisson batch; ``planned_steps`` the private D steps σ is calibrated for
    (:func:`~medsyngan.privacy.accounting.planned_private_steps`; the plan is
    :func:`~medsyngan.privacy.accounting.plan_dp`, as printed by `medsyngan privacy`); ``augment`` the per-image
    augmentation of real batches. Replaces ``trainer.d_update`` by a
    :class:`~medsyngan.privacy.session.PrivateDiscriminatorUpdate` and turns autocast off.

    With ``state`` (a previous ``DPSession.state_dict()``) σ, the plan, the seed and the accountant history come
    from it and nothing is recalibrated. ``seed`` fixes the secret sampling/noise seed (tests); default: drawn from
    the OS. ``engine``: 'auto', 'ghost', 'vmap' or 'loop' (:mod:`medsyngan.privacy.engines`). ``min_noise``: the
    smallest σ the caller accepts (a hospital policy's ``min_noise_multiplier``).

    Raises :class:`~medsyngan.errors.UserError` for a model Opacus cannot make private (naming the layer), lazy R1,
    a sampling rate above 1, a δ not below 1/units, or a target ε that the planned steps cannot meet.
    """
    if trainer.use_r1:
        raise UserError("lazy R1 touches real images outside DP-SGD; set train.r1_gamma=0 with privacy.dp")
    # A private generator: the probe must not move the global RNG (exact resume depends on it).
    probe_gen = torch.Generator(device=trainer.device).manual_seed(0)
    probe = torch.rand(2, 1, trainer.resolution, trainer.resolution, generator=probe_gen, device=trainer.device)
    probe = trainer.prepare_real(probe * 2 - 1)
    validate_discriminator(trainer.D, probe)

    unit, units = privacy_unit(privacy.unit, len(images), patients)
    secret = seed if seed is not None else secrets.randbits(63)
    if state is not None:
        accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        guaranteed = 0  # taken from the state
    else:
        plan = plan_dp(units, batch_size, planned_steps, privacy.target_epsilon, privacy.delta, unit,
                       release_noise=privacy.release_noise, min_noise=min_noise)
        accountant = plan.accountant()
        within = epsilon_of(plan.history(), plan.delta) <= privacy.target_epsilon
        guaranteed = planned_steps if within else 0
    sampler = PoissonUnitSampler(images, patients if unit == "patient" else None, batch_size, unit,
                                 secret, trainer.device, augment)
    release = None
    if privacy.mean_image_size:
        release = MeanImageRelease(images, patients if unit == "patient" else None, privacy.mean_image_size,
                                   privacy.mean_image_clip, privacy.mean_image_noise, privacy.mean_image_weight,
                                   trainer.G)
    session = DPSession(trainer, sampler, accountant, privacy.target_epsilon, privacy.max_grad_norm, guaranteed,
                        planned_steps, engine, clip_fake=privacy.clip_fake, release=release)
    if state is not None:
        session.load_state_dict(state)
    if isinstance(trainer.d_update, PrivateDiscriminatorUpdate):
        trainer.d_update.engine.remove()  # a session rebuilt on the same trainer (next round): drop the old hooks
    trainer.d_update = session.update
    # float32 throughout: per-sample norms rounded to bf16 can leave a "clipped" gradient above C, and the
    # sensitivity bound that ε rests on must hold exactly, not to 3 significant digits.
    trainer.autocast_dtype = None
    return session
