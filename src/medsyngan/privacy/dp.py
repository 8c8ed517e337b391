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

A conditional model also passes ``labels`` (N, c_dim), its training images' label vectors: the sampler returns
them with the images, and the generated batches' labels come from the public table or from the hospital's private
release of its label frequencies (:mod:`medsyngan.privacy.label_release`, part of target ε).

The session is a :class:`~medsyngan.privacy.session.DPSession` (re-exported here); what it makes private and why
is in :mod:`medsyngan.privacy.session`, the per-sample gradient engines are in :mod:`medsyngan.privacy.engines`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsyngan.config import AugmentSection, PrivacySection
from medsyngan.data.labels import plain_label_source
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import PrivacyAccountant, epsilon_of, plan_dp, resolve_unit
from medsyngan.privacy.engines import validate_discriminator
from medsyngan.privacy.label_release import LabelRelease, label_release_planned, one_off_noise
from medsyngan.privacy.moments import MeanImageRelease
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.privacy.session import DPSession, LedgerWriter, PrivateDiscriminatorUpdate
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
              min_noise: float = 0.0, labels: np.ndarray | None = None,
              ledger: tuple[LedgerWriter, str] | None = None) -> DPSession:
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
    smallest σ the caller accepts (a hospital policy's ``min_noise_multiplier``). ``ledger``: (write, name) of the
    store that keeps the session across rounds (a federated hospital's), attached before any release is charged.

    Raises :class:`~medsyngan.errors.UserError` for a model Opacus cannot make private (naming the layer), lazy R1,
    a sampling rate above 1, a δ not below 1/units, or a target ε that the planned steps cannot meet.
    """
    if trainer.use_r1:
        raise UserError("lazy R1 touches real images outside DP-SGD; set train.r1_gamma=0 with privacy.dp")
    # A private generator: the probe must not move the global RNG (exact resume depends on it).
    probe_gen = torch.Generator(device=trainer.device).manual_seed(0)
    probe = torch.rand(2, 1, trainer.resolution, trainer.resolution, generator=probe_gen, device=trainer.device)
    probe = trainer.prepare_real(probe * 2 - 1)
    if trainer.conditional and (labels is None or len(labels) != len(images)):
        raise UserError("a conditional model under DP needs one label vector per training image")
    probe_c = torch.zeros(2, trainer.label_layout.dim, device=trainer.device) if trainer.conditional else None
    validate_discriminator(trainer.D, probe, probe_c)
    release_labels = trainer.conditional and label_release_planned(trainer.cfg)
    release_noise = one_off_noise(privacy, release_labels)

    unit, units = privacy_unit(privacy.unit, len(images), patients)
    secret = seed if seed is not None else secrets.randbits(63)
    target = math.inf if privacy.clip_only else privacy.target_epsilon
    if state is not None:
        accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        _check_same_noise(accountant, privacy.clip_only)
        guaranteed = 0  # taken from the state
    else:
        plan = plan_dp(units, batch_size, planned_steps, privacy.target_epsilon, privacy.delta, unit,
                       release_noise=release_noise, min_noise=min_noise, clip_only=privacy.clip_only)
        accountant = plan.accountant()
        within = epsilon_of(plan.history(), plan.delta) <= target
        guaranteed = planned_steps if within else 0
    unit_ids = patients if unit == "patient" else None
    sampler = PoissonUnitSampler(images, unit_ids, batch_size, unit, secret, trainer.device, augment,
                                 labels=labels if trainer.conditional else None)
    label_release = None
    if release_labels:
        label_release = LabelRelease(labels, unit_ids, trainer.label_layout, privacy.label_noise)
    elif trainer.conditional:
        trainer.set_label_source(plain_label_source(trainer.cfg, labels))
    release = None
    if privacy.mean_image_size:
        release = MeanImageRelease(images, unit_ids, privacy.mean_image_size, privacy.mean_image_clip,
                                   privacy.mean_image_noise, privacy.mean_image_weight, trainer.G,
                                   reference_labels=_reference_labels(trainer) if trainer.conditional else None)
    session = DPSession(trainer, sampler, accountant, target, privacy.max_grad_norm, guaranteed,
                        planned_steps, engine, clip_fake=privacy.clip_fake, release=release, labels=label_release)
    if state is not None:
        session.load_state_dict(state)
    if ledger is not None:
        session.attach_ledger(*ledger)
    if label_release is not None:
        # After a saved release is read back: a resumed run reuses the published frequencies instead of charging
        # and drawing new ones.
        trainer.set_label_source(label_release.distribution())
    if isinstance(trainer.d_update, PrivateDiscriminatorUpdate):
        trainer.d_update.engine.remove()  # a session rebuilt on the same trainer (next round): drop the old hooks
    trainer.d_update = session.update
    # float32 throughout: per-sample norms rounded to bf16 can leave a "clipped" gradient above C, and the
    # sensitivity bound that ε rests on must hold exactly, not to 3 significant digits.
    trainer.autocast_dtype = None
    return session


def _check_same_noise(accountant: PrivacyAccountant, clip_only: bool) -> None:
    """A saved session keeps its σ: a run started with noise cannot go on without it, nor a clipping-only run
    (whose ledger says ε = ∞ for good) turn private."""
    if (accountant.noise_multiplier == 0) != clip_only:
        started = "clipping only (σ = 0)" if accountant.noise_multiplier == 0 else (
            f"with noise σ = {accountant.noise_multiplier:.4g}")
        raise UserError(f"the saved DP session (ledger or checkpoint) was started {started} but privacy.clip_only = "
                        f"{str(clip_only).lower()}; σ cannot change within a run: set privacy.clip_only back, or "
                        "start a new run")


def _reference_labels(trainer: GANTrainer):
    """Labels of the mean-image release's public reference images: the label source at a fixed seed."""
    def draw(n: int) -> torch.Tensor:
        assert trainer.label_source is not None
        return trainer.label_source.sample(n, torch.Generator().manual_seed(0))
    return draw
