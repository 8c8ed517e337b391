"""The DP session of one hospital (or of a centralized run), and the private discriminator update it installs.

A :class:`DPSession` holds the Poisson unit sampler, the accountant (never reset), the calibrated σ and the
:class:`PrivateDiscriminatorUpdate`; :func:`medsyngan.privacy.dp.enable_dp` builds it. Its whole state is plain
JSON (:meth:`DPSession.state_dict`), kept with the trainer state and in checkpoints, so a resumed run or the next
federated round continues the same accountant and the same secret streams.

What is private and why
-----------------------
- **Unit.** A patient when patient ids exist (NIH has them): each step samples patients with probability
  q = expected batch / patients and takes one random image of each (``sampling.py``), so the accountant uses the
  patient rate. Image-level when no ids exist or every patient has one image; ``unit`` says which.
- **One private step = one D update.** Real samples' gradients are clipped per sample to C, summed, noised with
  N(0, σ²C²) and divided by the EXPECTED batch size (Opacus' convention for Poisson sampling: the denominator must
  not depend on the data). Every D update, including one with an empty batch (noise only), is one accountant step.
- **Generated samples are not clipped or noised.** The fake batch is a function of G, whose parameters are a
  post-processing of previous private D updates and public noise; the gradient of the mean fake loss therefore
  reveals nothing new about the data and is added unclipped. Opacus' DCGAN example instead clips real and fake
  per-sample gradients together in one batch (Opacus issue #418): that spends part of the clipping budget C on
  public samples, shrinks the real signal, and makes the denominator the real+fake batch, while the accountant is
  still charged for the real rate. Our scheme charges exactly one subsampled Gaussian step per D update and clips
  only what touches data. ``privacy.clip_fake`` clips each generated sample's gradient to C as well (still
  without noise or privacy cost): otherwise a D that finds the real images unlike anything it has seen (a D
  pretrained on phantoms meeting X-rays) gets per-sample real gradients clipped from norms of ~40 down to 1 while
  the fake side keeps its full size, and learns only to push fakes down. The WGAN-GP penalty interpolates
  real[i] with a fake and so sits inside sample i's clipped loss. The generator step sees data only through D
  (post-processing, no privacy cost, no per-sample machinery).
- **Lazy R1 is refused** under DP: it is an extra optimizer step on real images that would need its own clipping,
  noise and accounting, doubling the cost of the budget for a regularizer; use ``train.r1_gamma = 0``.
- **Labels.** A conditional D sees each real image's labels inside that sample's clipped loss (they are part of
  the sample); generated images' labels come from public frequencies or from the one-off private release of the
  hospital's label frequencies (``label_release.py``), never from the batch.
- **Released diagnostics.** The private update reports only the loss on generated images. The real-sample loss is
  a statistic of the private batch that the accountant does not cover, so it is not reported.
- **Secret randomness.** Amplification by subsampling assumes nobody knows who was sampled, and the noise is only
  noise if it cannot be predicted: the sampling and noise streams come from a seed drawn from the OS (not the run's
  public seed) and kept in the hospital's state, so a resumed run is exact and the seed never leaves the hospital.
  Each stream's seed is :func:`stream_seed` of that secret and the stream's id. (Floating-point attacks on the
  Gaussian sampler, Mironov 2012, are out of scope, as in Opacus without ``secure_mode``.)
- **What ε covers:** every D update on real data of this hospital, for the whole run. Not covered: choices made
  by a person looking at private outputs (e.g. picking a checkpoint by a metric on real data) — do not do that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medsyngan.errors import UserError
from medsyngan.privacy.accounting import PrivacyAccountant, combined_noise, one_off_release
from medsyngan.privacy.engines import make_engine
from medsyngan.privacy.label_release import LabelRelease
from medsyngan.privacy.moments import MeanImageRelease
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer

STATE_VERSION = 1
# Stream ids under the session's secret seed: 0 and 1 are the sampler's (batches, augmentation; sampling.py).
NOISE_STREAM = 2
RELEASE_STREAM = 3
LABEL_STREAM = 5


# ====================================================================== the private update
class PrivateDiscriminatorUpdate(DiscriminatorUpdate):
    """DP-SGD discriminator update: clipped, noised real gradients + the unclipped fake gradient; one accounted step.

    ``private_steps`` counts the optimizer steps this update took; the session's accountant is charged once per
    step, before the parameters change, so a crash can only over-count.
    """

    private = True

    def __init__(self, session: "DPSession", engine):
        self.session = session
        self.engine = engine
        self.private_steps = 0

    def step(self, trainer: GANTrainer, real: Tensor, fake: Tensor, real_c: Tensor | None = None,
             fake_c: Tensor | None = None) -> dict[str, Tensor]:
        s = self.session
        s.check_budget()
        clip, sigma, expected = s.max_grad_norm, s.noise_multiplier, s.expected_batch
        trainer.opt_d.zero_grad(set_to_none=True)
        grads, fake_loss = self.engine.gradients(trainer, real, fake, clip, expected,
                                                 fake_clip=clip if s.clip_fake else None, real_c=real_c,
                                                 fake_c=fake_c)
        noise_gen = s.noise_generator(s.steps)
        std = sigma * clip / expected
        for p in trainer.D.parameters():
            if not p.requires_grad:
                continue
            g = grads.get(p)
            if g is None:
                g = torch.zeros_like(p)
            if std > 0:
                noise = torch.randn(p.shape, generator=noise_gen, device=noise_gen.device, dtype=torch.float32)
                g = g + noise.to(device=p.device, dtype=p.dtype) * std
            p.grad = g
        s.accountant.step(1)
        trainer.opt_d.step()
        self.private_steps += 1
        return {"d_fake": fake_loss}

    def regularize(self, trainer: GANTrainer, real: Tensor, real_c: Tensor | None = None) -> dict[str, Tensor]:
        raise UserError("lazy R1 touches real images outside DP-SGD; set train.r1_gamma=0 with privacy.dp")


def stream_seed(secret: int, *stream: int) -> int:
    """A torch seed for one stream under the session's secret seed."""
    return int(np.random.SeedSequence([secret, *stream]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


# ====================================================================== the session
class DPSession:
    """The DP state of one hospital (or of a centralized run): sampler, accountant, σ, and the private update.

    ``next_real`` (batch source for ``train_step``), ``epsilon()`` → {'rdp', 'prv', 'reported'} (reported = the
    larger), ``metrics()``, ``steps`` (private steps accounted), ``steps_left()``, ``noise_multiplier``,
    ``sample_rate``, ``delta``, ``unit``, ``units``, ``target_epsilon``, ``summary()``, ``state_dict()`` /
    ``load_state_dict()``. A step that would take ε above the target raises
    :class:`~medsyngan.privacy.accounting.BudgetExceeded` before anything is computed.
    """

    def __init__(self, trainer: GANTrainer, sampler: PoissonUnitSampler, accountant: PrivacyAccountant,
                 target_epsilon: float, max_grad_norm: float, guaranteed_steps: int, planned_steps: int,
                 engine: str = "auto", clip_fake: bool = False, release: MeanImageRelease | None = None,
                 labels: LabelRelease | None = None):
        self.trainer = trainer
        self.labels = labels
        self.clip_fake = bool(clip_fake)
        self.sampler = sampler
        self.accountant = accountant
        self.target_epsilon = float(target_epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.guaranteed_steps = int(guaranteed_steps)
        self.planned_steps = int(planned_steps)
        self.update = PrivateDiscriminatorUpdate(self, make_engine(trainer, engine))
        self.engine = self.update.engine.name
        self.release = release
        if release is not None:
            trainer.g_extra_loss = release

    # ------------------------------------------------------------------ what the trainer and the reports use
    @property
    def next_real(self) -> Callable[[], Tensor]:
        return self.sampler

    @property
    def released(self) -> list[tuple[float, float, int]]:
        """The accountant entries paid up front for the one-off releases (mean image, label frequencies), as one
        combined Gaussian; private D steps come after them."""
        sigma = combined_noise(self.release.noise_multiplier if self.release is not None else 0.0,
                               self.labels.noise_multiplier if self.labels is not None else 0.0)
        return [one_off_release(sigma)] if sigma else []

    @property
    def steps(self) -> int:
        """Private D steps accounted (the mean-image release is not one)."""
        return self.accountant.steps - len(self.released)

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    @property
    def sample_rate(self) -> float:
        return self.accountant.sample_rate

    @property
    def delta(self) -> float:
        return self.accountant.delta

    @property
    def unit(self) -> str:
        return self.sampler.unit

    @property
    def units(self) -> int:
        return self.sampler.units

    @property
    def expected_batch(self) -> int:
        return self.sampler.expected_batch

    def epsilon(self) -> dict[str, float]:
        """ε spent so far: {'rdp', 'prv', 'reported' (the larger)}."""
        return self.accountant.epsilon()

    def metrics(self) -> dict[str, float]:
        eps = self.epsilon()
        return {"epsilon": eps["reported"], "epsilon_rdp": eps["rdp"], "epsilon_prv": eps["prv"]}

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "units": self.units, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "delta": self.delta, "target_epsilon": self.target_epsilon, "steps": self.steps,
                "planned_steps": self.planned_steps, "engine": self.engine, "clip_fake": self.clip_fake,
                "mean_image_noise": self.release.noise_multiplier if self.release is not None else None,
                "label_noise": self.labels.noise_multiplier if self.labels is not None else None,
                **self.metrics()}

    def _single_mechanism(self) -> bool:
        """The history is the planned release (if any), then D steps at the calibrated (σ, q) only."""
        h = self.accountant.history
        head, tail = h[:len(self.released)], h[len(self.released):]
        return head == self.released and all((sigma, q) == (self.noise_multiplier, self.sample_rate)
                                             for sigma, q, _ in tail)

    def check_budget(self, n: int = 1) -> None:
        """Raise BudgetExceeded when n more private steps would take ε above the target.

        Within the calibrated plan the answer is known without running the accountants (they take a fraction of
        a second each); past it, or after σ or q changed, the accountants decide.
        """
        if self.steps + n <= self.guaranteed_steps and self._single_mechanism():
            return
        self.accountant.check_budget(self.target_epsilon, n)

    def steps_left(self) -> int:
        """Private steps still allowed within the calibrated plan (0 past it; check_budget has the final word)."""
        return max(0, self.guaranteed_steps - self.steps) if self._single_mechanism() else 0

    def noise_generator(self, step: int) -> torch.Generator:
        gen = torch.Generator(device=self.trainer.device)
        gen.manual_seed(stream_seed(self.sampler.seed, NOISE_STREAM, step))
        return gen

    # ------------------------------------------------------------------ persistent state (plain JSON)
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant.state_dict(),
            "sampler": self.sampler.state_dict(),
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "guaranteed_steps": self.guaranteed_steps,
            "planned_steps": self.planned_steps,
            "mean_image": self.release.state_dict() if self.release is not None else None,
            "labels": self.labels.state_dict() if self.labels is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"DP state has version {state.get('version')!r}; expected {STATE_VERSION}")
        self.accountant.load_state_dict(state["accountant"])
        self.sampler.load_state_dict(state["sampler"])
        self.target_epsilon = float(state["target_epsilon"])
        self.max_grad_norm = float(state["max_grad_norm"])
        self.guaranteed_steps = int(state["guaranteed_steps"])
        self.planned_steps = int(state["planned_steps"])
        if self.release is not None and state.get("mean_image") is not None:
            self.release.load_state_dict(state["mean_image"])
        if self.labels is not None and state.get("labels") is not None:
            self.labels.load_state_dict(state["labels"])
