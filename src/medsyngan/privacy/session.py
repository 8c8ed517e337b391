"""The DP session of one hospital (or of a centralized run), and the private discriminator update it installs.

A :class:`DPSession` holds the Poisson unit sampler, the accountant (never reset), the calibrated σ and the
:class:`PrivateDiscriminatorUpdate`; :func:`medsyngan.privacy.dp.enable_dp` builds it. Its whole state is plain
JSON (:meth:`DPSession.state_dict`): a federated hospital's ledger, a centralized run's checkpoints, so a resumed
run or the next federated round continues the same accountant and the same secret streams.

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
  public seed) and kept in the hospital's ledger, so a resumed run is exact and the seed never leaves the hospital.
  Each stream's seed is :func:`stream_seed` of that secret and the stream's id. (Floating-point attacks on the
  Gaussian sampler, Mironov 2012, are out of scope, as in Opacus without ``secure_mode``.)
- **Never rolled back.** Every private step has an index t: batch t of the sampler and noise stream t, both
  from the secret seed, and no index is used twice. A federated hospital charges a round's planned steps to its
  accountant and writes its ledger (:meth:`DPSession.attach_ledger`, fsync'd, atomically) BEFORE the first of them
  runs, and a one-off release is charged and written before it is computed; after the round the charge is
  corrected to the steps that ran. A hospital brought back to an older round takes its session from the ledger,
  so a retried round draws fresh batches and fresh noise and pays for them as new steps; a crash can only make
  the ledger over-count.
- **What ε covers:** every D update on real data of this hospital, and its one-off releases (mean image, label
  frequencies), for the whole run. Not covered: choices made
  by a person looking at private outputs (e.g. picking a checkpoint by a metric on real data) — do not do that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medsyngan.errors import UserError
from medsyngan.privacy.accounting import RELATION, BudgetExceeded, PrivacyAccountant, combined_noise, one_off_release
from medsyngan.privacy.engines import make_engine
from medsyngan.privacy.label_release import LabelRelease
from medsyngan.privacy.moments import MeanImageRelease
from medsyngan.privacy.sampling import PoissonUnitSampler
from medsyngan.training.step import DiscriminatorUpdate, GANTrainer

STATE_VERSION = 2
# Stream ids under the session's secret seed: 0 and 1 are the sampler's (batches, augmentation; sampling.py).
NOISE_STREAM = 2
RELEASE_STREAM = 3
LABEL_STREAM = 5

LedgerWriter = Callable[[dict[str, Any]], None]


# ====================================================================== the private update
class PrivateDiscriminatorUpdate(DiscriminatorUpdate):
    """DP-SGD discriminator update: clipped, noised real gradients + the unclipped fake gradient; one accounted step.

    ``private_steps`` counts the optimizer steps this update took. Each step is charged before the parameters
    change: it consumes a step the session reserved up front, or (no reservation) charges one itself.
    """

    private = True

    def __init__(self, session: "DPSession", engine):
        self.session = session
        self.engine = engine
        self.private_steps = 0

    def step(self, trainer: GANTrainer, real: Tensor, fake: Tensor, real_c: Tensor | None = None,
             fake_c: Tensor | None = None) -> dict[str, Tensor]:
        s = self.session
        index = s.charge_step()
        clip, sigma, expected = s.max_grad_norm, s.noise_multiplier, s.expected_batch
        trainer.opt_d.zero_grad(set_to_none=True)
        grads, fake_loss = self.engine.gradients(trainer, real, fake, clip, expected,
                                                 fake_clip=clip if s.clip_fake else None, real_c=real_c,
                                                 fake_c=fake_c)
        noise_gen = s.noise_generator(index)
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

    ``next_real`` (batch source for ``train_step``), ``epsilon()`` → {'reported' (replace-one), 'add_remove', …},
    ``metrics()``, ``steps`` (private steps charged), ``releases`` (mean-image releases charged), ``steps_left()``,
    ``noise_multiplier``, ``sample_rate``, ``delta``, ``unit``, ``units``, ``target_epsilon``, ``summary()``,
    ``reserve(n)`` / ``settle()`` around a federated round, ``attach_ledger()``, ``state_dict()`` /
    ``load_state_dict()``. A step or release that would take ε above the target raises
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
        self.noise_draws = 0  # index of the next private step's noise stream
        self.releases = 0  # one-off release charges made (each with its own noise streams)
        self.one_off_made: set[str] = set()  # the releases ('mean_image', 'labels') the latest charge paid for
        self.pending = 0  # steps charged up front by reserve() that have not run yet
        self._ledger: LedgerWriter | None = None
        self.ledger_name = ""
        self.release = release
        # Both one-off releases are one Gaussian mechanism of the combined σ (accounting.combined_noise): one charge
        # pays for one mean image and one label release, whichever comes first.
        self.one_off_noise = combined_noise(release.noise_multiplier if release is not None else 0.0,
                                            labels.noise_multiplier if labels is not None else 0.0)
        if release is not None:
            release.begin = lambda: self._begin_release("mean_image", RELEASE_STREAM)
            release.finished = self._write_ledger
            trainer.g_extra_loss = release
        if labels is not None:
            labels.begin = lambda: self._begin_release("labels", LABEL_STREAM)
            labels.finished = self._write_ledger

    # ------------------------------------------------------------------ what the trainer and the reports use
    @property
    def next_real(self) -> Callable[[], Tensor]:
        return self.sampler

    @property
    def steps(self) -> int:
        """Private D steps charged (a one-off release is not one)."""
        return self.accountant.steps - self.releases

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
        """ε spent so far: 'reported' (replace-one), 'add_remove' (Opacus' larger), 'replace_one', 'rdp', 'prv'."""
        return self.accountant.epsilon()

    def metrics(self) -> dict[str, float]:
        eps = self.epsilon()
        return {"epsilon": eps["reported"], "epsilon_add_remove": eps["add_remove"]}

    def summary(self) -> dict[str, Any]:
        return {"unit": self.unit, "units": self.units, "sample_rate": self.sample_rate,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "delta": self.delta, "target_epsilon": self.target_epsilon, "steps": self.steps,
                "planned_steps": self.planned_steps, "engine": self.engine, "clip_fake": self.clip_fake,
                "mean_image_noise": self.release.noise_multiplier if self.release is not None else None,
                "label_noise": self.labels.noise_multiplier if self.labels is not None else None,
                "relation": RELATION, **self.metrics()}

    def _within_plan(self, n: int) -> bool:
        """Whether n more steps stay inside the calibrated plan: its steps at its (σ, q) and at most its one
        release; then the answer is known without running the accountant."""
        planned_release = [one_off_release(self.one_off_noise)] if self.one_off_noise else []
        if self.steps + n > self.guaranteed_steps or self.releases > len(planned_release):
            return False
        calibrated = (self.noise_multiplier, self.sample_rate)
        return all((sigma, q) == calibrated or (sigma, q, steps) in planned_release
                   for sigma, q, steps in self.accountant.history)

    def check_budget(self, n: int = 1) -> None:
        """Raise BudgetExceeded when n more private steps would take ε above the target."""
        if not self._within_plan(n):
            self.accountant.check_budget(self.target_epsilon, n, self.ledger_name)

    def steps_left(self) -> int:
        """Private steps still allowed within the calibrated plan (0 past it; check_budget has the final word)."""
        return max(0, self.guaranteed_steps - self.steps) if self._within_plan(0) else 0

    def noise_generator(self, index: int) -> torch.Generator:
        gen = torch.Generator(device=self.trainer.device)
        gen.manual_seed(stream_seed(self.sampler.seed, NOISE_STREAM, index))
        return gen

    # ------------------------------------------------------------------ charging, before anything is computed
    def charge_step(self) -> int:
        """Charge one private step (or consume one reserved); returns its noise stream's index."""
        if self.pending:
            self.pending -= 1
        else:
            self.check_budget(1)
            self.accountant.step(1)
        index = self.noise_draws
        self.noise_draws += 1
        return index

    def reserve(self, n: int) -> None:
        """Charge n steps up front and write the ledger before any of them runs (a federated round)."""
        if self.pending:
            raise RuntimeError("a reservation is still open; settle() it first")
        self.check_budget(n)
        self.accountant.step(n)
        self.pending = n
        self._write_ledger()

    def settle(self) -> None:
        """Take back the reserved steps that did not run (the round stopped early here) and write the ledger."""
        self.accountant.refund(self.pending)
        self.pending = 0
        self._write_ledger()

    def _begin_release(self, kind: str, stream: int) -> int:
        """Charge a one-off release (``kind``: 'mean_image' or 'labels') unless the latest charge has not paid for
        one of that kind yet, and write the ledger; returns the seed of the release's own noise."""
        if self.releases and kind not in self.one_off_made:
            self.one_off_made.add(kind)
        else:
            release = one_off_release(self.one_off_noise)
            first_of_plan = self.releases == 0 and self._within_plan(0)
            if not first_of_plan and ((after := self.accountant.replace_one_after(extra=[release]))
                                      > self.target_epsilon):
                where = f" (ledger {self.ledger_name})" if self.ledger_name else ""
                raise BudgetExceeded(f"the {kind.replace('_', '-')} release would spend ε = {after:.4g} "
                                     f"({RELATION}) > target {self.target_epsilon:g}{where}; training stops here")
            self.releases += 1
            self.one_off_made = {kind}
            self.accountant.record(*release)
        self._write_ledger()
        return stream_seed(self.sampler.seed, stream, self.releases)

    # ------------------------------------------------------------------ the ledger and persistent state (plain JSON)
    def attach_ledger(self, write: LedgerWriter, name: str) -> None:
        """Write the session's state with ``write`` at every charge; ``name`` (a path) is quoted in refusals."""
        self._ledger, self.ledger_name = write, name

    def _write_ledger(self) -> None:
        if self._ledger is not None:
            self._ledger(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """The session; steps reserved but not run count as drawn, so that no batch or noise is ever reused."""
        sampler = {**self.sampler.state_dict(), "draws": self.sampler.draws + self.pending}
        return {
            "version": STATE_VERSION,
            "accountant": self.accountant.state_dict(),
            "sampler": sampler,
            "noise_draws": self.noise_draws + self.pending,
            "releases": self.releases,
            "one_off_made": sorted(self.one_off_made),
            "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm,
            "guaranteed_steps": self.guaranteed_steps,
            "planned_steps": self.planned_steps,
            "mean_image": self.release.state_dict() if self.release is not None else None,
            "labels": self.labels.state_dict() if self.labels is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = _upgrade(state, self.release)
        self.accountant.load_state_dict(state["accountant"])
        self.sampler.load_state_dict(state["sampler"])
        self.noise_draws = int(state["noise_draws"])
        self.releases = int(state["releases"])
        # A state without the field paid for both kinds (or none): a new release of either is charged anew.
        self.one_off_made = set(state.get("one_off_made", ["mean_image", "labels"] if self.releases else []))
        self.pending = 0
        self.target_epsilon = float(state["target_epsilon"])
        self.max_grad_norm = float(state["max_grad_norm"])
        self.guaranteed_steps = int(state["guaranteed_steps"])
        self.planned_steps = int(state["planned_steps"])
        if self.release is not None and state.get("mean_image") is not None:
            self.release.load_state_dict(state["mean_image"])
        if self.labels is not None and state.get("labels") is not None:
            self.labels.load_state_dict(state["labels"])


def _upgrade(state: dict[str, Any], release: MeanImageRelease | None) -> dict[str, Any]:
    """A version-1 state (checkpoints of earlier MedSynGAN versions): its accountant charged the planned release
    from the start and its noise index was the number of private steps."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version != 1:
        raise UserError(f"DP state has version {version!r}; expected {STATE_VERSION}")
    releases = 1 if release is not None else 0
    steps = sum(int(n) for _, _, n in state["accountant"]["history"]) - releases
    return {**state, "version": STATE_VERSION, "noise_draws": steps, "releases": releases,
            "one_off_made": ["mean_image"] if releases else []}
