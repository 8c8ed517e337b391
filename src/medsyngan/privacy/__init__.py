"""Privacy and security: patient-level DP-SGD, DP accounting, the update codec, end-to-end encryption and secure
aggregation.

Public API of DP-SGD (in the style of Opacus' ``PrivacyEngine``: one call makes a trainer private)
--------------------------------------------------------------------------------------------------
``medsyngan.privacy.dp.enable_dp(trainer, images, patients, privacy, *, batch_size, planned_steps, augment=None,
state=None, seed=None, engine="auto", min_noise=0.0) -> DPSession``
    Validates the discriminator, calibrates σ for ``planned_steps`` private D steps
    (:func:`~medsyngan.privacy.accounting.planned_private_steps` of the run's configuration) or restores σ, the
    secret seed and the accountant from ``state``, and replaces ``trainer.d_update`` by the private update.
    ``privacy`` is the configuration's ``PrivacySection``, ``batch_size`` the expected Poisson batch,
    ``augment`` the ``AugmentSection`` of real batches. Bad models and settings raise a one-line ``UserError``.
``medsyngan.privacy.dp.DPSession``
    ``next_real`` (the batch source for ``GANTrainer.train_step``), ``epsilon()`` (replace-one reported,
    add/remove-one beside it), ``metrics()``, ``steps``, ``steps_left()``, ``summary()``, ``reserve(n)`` /
    ``settle()`` around a federated round, ``attach_ledger(write, name)``, ``state_dict()`` (plain JSON: a
    hospital's ledger or a centralized run's checkpoint; the accountant is never reset). A step past the target ε
    raises ``accounting.BudgetExceeded`` before anything is computed.

Modules
-------
- ``dp``: the entry point above and ``privacy_unit``.
- ``session``: the DP session and the private discriminator update; what is private and why.
- ``engines``: per-sample gradient engines (ghost clipping, torch.func vmap, per-sample loop).
- ``accounting``, ``sampling``, ``moments``: the accountant and plan, Poisson unit sampling, the private mean image.
- ``codec``, ``crypto``, ``secagg``: the update's wire format, encryption, secure aggregation.

``accounting``, ``codec``, ``crypto`` and ``secagg`` import neither torch nor Flower (``accounting`` loads
dp-accounting and opacus only when it computes ε or σ), so the aggregator runs the codec without a GPU stack and
tests exercise them without a running federation. The DP-SGD modules (``dp``, ``session``, ``engines``, ``sampling``, ``moments``)
use torch.
"""
