"""Privacy accounting: ε over a whole run, from both Opacus accountants, with a history that is never reset.

A hospital's accountant lives in its persistent state and in checkpoints (``state_dict`` is plain JSON). It
records every private step as (noise multiplier, sampling rate, steps) in the same run-length form as Opacus, so
a change of σ or q mid-run is accounted for exactly. ε is computed by two accountants and the larger is reported:

- RDP (Mironov 2017; Mironov, Talwar & Zhang 2019): a conservative upper bound, the figure most papers quote.
- PRV (Gopi, Lee & Wutschitz 2021): numerically tight; Opacus returns its upper error bound, so it is also a
  guarantee, usually 5–10 % below RDP.

The same class serves client-level DP-FedAvg (:func:`client_level_accountant`): there the unit is a hospital,
one step is one round and the sampling rate is the fraction of hospitals sampled per round.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from medsyngan.config import Config
from medsyngan.errors import UserError

Accountant = Literal["rdp", "prv", "max"]
MECHANISMS = ("rdp", "prv")
STATE_VERSION = 1

#: δ never exceeds this, whatever the number of units (the issue's default); see :func:`default_delta`.
DELTA_CAP = 1e-5


def default_delta(units: int) -> float:
    """δ = min(1e-5, 1 / (2 · units)).

    δ bounds the probability that the guarantee fails outright; a δ of 1/units would allow a mechanism that
    publishes one unit's record in full. 1e-5 (the issue's default) is far below that line for any hospital of
    up to 50 000 units; a larger hospital gets 1/(2 · units), half the line, so δ always stays clear of it.
    """
    if units < 1:
        raise UserError(f"a hospital has {units} privacy units; DP needs at least one patient or image")
    return min(DELTA_CAP, 1.0 / (2 * units))


def one_off_release(noise_multiplier: float) -> tuple[float, float, int]:
    """The history entry of a Gaussian mechanism applied once to all of a hospital's units (q = 1, one step)."""
    return (float(noise_multiplier), 1.0, 1)


def combined_noise(*noise_multipliers: float) -> float:
    """σ of the one Gaussian mechanism that equals several one-off releases (q = 1) of the same units, each of
    sensitivity-normalised noise σ_i (0: not made): 1/σ² = Σ 1/σ_i². Both accountants compose Gaussians exactly
    so (RDP: α/2σ² adds; PRV: Gaussian privacy-loss distributions), so one history entry stands for all of them."""
    made = [s for s in noise_multipliers if s]
    return sum(s**-2 for s in made) ** -0.5 if made else 0.0


def validate(sample_rate: float, noise_multiplier: float | None = None, delta: float | None = None,
             units: int | None = None) -> None:
    """Reject parameters that would make a reported ε meaningless, with the fix in the message."""
    if not 0 < sample_rate <= 1:
        raise UserError(
            f"sampling rate {sample_rate:g} is outside (0, 1]; it is batch size / privacy units, "
            "so lower the batch size or give the hospital more data"
        )
    if noise_multiplier is not None and noise_multiplier < 0:
        raise UserError(f"noise multiplier {noise_multiplier:g} is negative; use σ ≥ 0")
    if delta is not None:
        if not 0 < delta < 1:
            raise UserError(f"δ = {delta:g} must lie in (0, 1); 1e-5 is the usual choice")
        if units is not None and delta >= 1.0 / units:
            raise UserError(
                f"δ = {delta:g} is not below 1 / privacy units (1/{units} = {1.0 / units:.3g}): such a δ allows "
                f"leaking a whole record; set privacy.delta below {1.0 / units:.3g} or 0 for the default"
            )


def _opacus_accountant(mechanism: str, history: list[tuple[float, float, int]]):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    acc.history = [tuple(h) for h in history]
    return acc


def epsilon_of(history: list[tuple[float, float, int]], delta: float, mechanism: str) -> float:
    """ε of a history under one accountant; 0 before any step and ∞ when any step added no noise."""
    if not history or all(steps == 0 for _, _, steps in history):
        return 0.0
    if any(sigma == 0 for sigma, _, steps in history if steps):
        return math.inf
    history = [h for h in history if h[2]]
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is the largest one it tries (small-ε regime) and the PRV
        # discretisation divides by zero at q = 1; neither changes the returned bound's validity.
        warnings.simplefilter("ignore")
        return float(_opacus_accountant(mechanism, history).get_epsilon(delta=delta))


class PrivacyAccountant:
    """ε of one hospital (or of the client-level mechanism) over the whole run.

    ``step(n)`` counts n private steps at the current (σ, q); :meth:`set_mechanism` changes them for later steps
    without touching the past. The history only grows: :meth:`load_state_dict` refuses a state that would lose
    steps already taken, so resuming from an older checkpoint cannot quietly report a smaller ε.
    """

    def __init__(self, sample_rate: float, noise_multiplier: float, delta: float, *, unit: str = "patient",
                 units: int | None = None):
        validate(sample_rate, noise_multiplier, delta, units)
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.unit = unit
        self.units = units
        self.history: list[tuple[float, float, int]] = []
        self._cache: tuple[int, dict[str, float]] | None = None

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def set_mechanism(self, *, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        validate(self.sample_rate if sample_rate is None else sample_rate, noise_multiplier, None, None)
        if noise_multiplier is not None:
            self.noise_multiplier = float(noise_multiplier)
        if sample_rate is not None:
            self.sample_rate = float(sample_rate)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Account ``steps`` runs of another Gaussian mechanism (e.g. a one-off release at q = 1) without
        changing the (σ, q) of later :meth:`step` calls."""
        validate(sample_rate, noise_multiplier, None, None)
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self._cache = None

    def step(self, n: int = 1) -> None:
        if n < 0:
            raise ValueError("a negative number of steps cannot be accounted")
        if n == 0:
            return
        sigma, q = self.noise_multiplier, self.sample_rate
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))
        self._cache = None

    def epsilon(self) -> dict[str, float]:
        """{'rdp': ε, 'prv': ε, 'reported': the larger}; cached until the next step."""
        if self._cache is not None and self._cache[0] == self.steps:
            return dict(self._cache[1])
        eps = {m: epsilon_of(self.history, self.delta, m) for m in MECHANISMS}
        eps["reported"] = max(eps.values())
        self._cache = (self.steps, eps)
        return dict(eps)

    def epsilon_after(self, n: int) -> dict[str, float]:
        """ε if n more steps were taken now at the current (σ, q); the accountant itself does not change."""
        probe = PrivacyAccountant.from_state_dict(self.state_dict())
        probe.step(n)
        return probe.epsilon()

    def check_budget(self, target_epsilon: float, n: int) -> None:
        """Raise :class:`BudgetExceeded` when n more steps would take the reported ε above the target."""
        after = self.epsilon_after(n)["reported"]
        if after > target_epsilon:
            raise BudgetExceeded(
                f"{n} more private steps would spend ε = {after:.4g} > target {target_epsilon:g} "
                f"(spent so far {self.epsilon()['reported']:.4g} after {self.steps} steps); training stops here"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "unit": self.unit,
            "units": self.units,
            "history": [[sigma, q, steps] for sigma, q, steps in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"accountant state has version {state.get('version')!r}; expected {STATE_VERSION}")
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        if sum(n for _, _, n in history) < self.steps:
            raise UserError(
                f"accountant state holds {sum(n for _, _, n in history)} steps but {self.steps} were already "
                "counted; resume from the newest checkpoint so that no private step is forgotten"
            )
        self.sample_rate = float(state["sample_rate"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.delta = float(state["delta"])
        self.unit = str(state["unit"])
        self.units = state["units"]
        self.history = history
        self._cache = None

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyAccountant":
        acc = cls(state["sample_rate"], state["noise_multiplier"], state["delta"], unit=state["unit"],
                  units=state["units"])
        acc.load_state_dict(state)
        return acc


class BudgetExceeded(UserError):
    """The next private steps would exceed the hospital's ε budget: it refuses to train further."""


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: Accountant = "max", prior: list[tuple[float, float, int]] | None = None) -> float:
    """The smallest noise multiplier (to Opacus' 0.01 ε tolerance) whose ε after ``steps`` is ≤ the target.

    ``accountant="max"`` calibrates against the reported figure, max(RDP, PRV): it starts from the RDP answer and
    only searches again with PRV in the rare case where PRV's upper bound lies above RDP's. ``prior``: mechanisms
    the same budget also pays for (history entries, e.g. the mean-image release); σ is then the smallest that
    keeps their composition with the steps within the target.
    """
    validate(sample_rate, None, delta)
    if target_epsilon <= 0:
        raise UserError(f"target ε = {target_epsilon:g} must be positive")
    if steps < 1:
        raise UserError(f"planned private steps = {steps}; calibration needs at least one step")
    if accountant not in ("rdp", "prv", "max"):
        raise UserError(f"accountant '{accountant}' is unknown; use rdp, prv or max")
    mechanisms = MECHANISMS if accountant == "max" else (accountant,)
    sigma = 0.0
    for mechanism in mechanisms:
        if sigma and epsilon_of([(sigma, sample_rate, steps)], delta, mechanism) <= target_epsilon:
            continue
        sigma = max(sigma, _search(target_epsilon, delta, sample_rate, steps, mechanism))
    if prior:
        sigma = _search_with_prior(target_epsilon, delta, sample_rate, steps, mechanisms, list(prior), sigma)
    return sigma


def _search_with_prior(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                       mechanisms: tuple[str, ...], prior: list[tuple[float, float, int]], start: float) -> float:
    """Bisection from ``start`` (σ without the prior, a lower bound) to within 0.5% of the smallest σ that fits."""
    def fits(sigma: float) -> bool:
        history = prior + [(sigma, sample_rate, steps)]
        return all(epsilon_of(history, delta, m) <= target_epsilon for m in mechanisms)

    alone = max(epsilon_of(prior, delta, m) for m in mechanisms)
    if alone >= target_epsilon:
        raise UserError(
            f"the one-off releases (mean image, label frequencies) alone spend ε = {alone:.3g} of the target "
            f"{target_epsilon:g}; raise privacy.mean_image_noise or privacy.label_noise, raise the target ε, or "
            "set privacy.mean_image_size=0 / train.label_source='public'"
        )
    low, high = start, start * 1.25
    while not fits(high):
        low, high = high, high * 1.5
    while high / low > 1.005:
        middle = (low * high) ** 0.5
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _search(target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=mechanism))
    except ValueError:
        # Opacus gives up past σ = 1e6. With RDP this also happens for any target below the floor that its
        # largest order (63) can certify, about 0.1 at δ = 1e-5, however much noise is added.
        raise UserError(
            f"target ε = {target_epsilon:g} cannot be met with δ = {delta:g}, sampling rate {sample_rate:g} and "
            f"{steps} private steps ({mechanism.upper()} accountant); raise the target ε, plan fewer steps "
            "or lower the batch size"
        ) from None


def client_level_accountant(fraction: float, noise_multiplier: float, hospitals: int,
                            delta: float = 0.0) -> PrivacyAccountant:
    """Accountant of DP-FedAvg (McMahan et al. 2018): unit = hospital, one step per round, q = fraction sampled.

    The analysis assumes each hospital joins a round independently with probability ``fraction`` and that the
    noise std on the sum of clipped updates is σ·C. At fraction = 1 (the default: every hospital every round)
    there is no sampling and the figure is exact; with a fixed-size sample of a fraction below 1 it is the
    customary approximation, stated as such in the guide.
    """
    if hospitals < 1:
        raise UserError(f"federated.hospitals = {hospitals}; client-level DP needs at least one hospital")
    delta = delta or default_delta(hospitals)
    return PrivacyAccountant(fraction, noise_multiplier, delta, unit="hospital", units=hospitals)


def planned_private_steps(cfg: Config) -> int:
    """Discriminator steps a hospital may take over the whole run: the number the noise is calibrated for.

    Federated: rounds × local generator steps × D steps per G step (a hospital that sits out a round spends
    less, never more). Centralized: train.steps × D steps per G step.
    """
    per_g = cfg.train.d_steps_per_g
    if cfg.federated.enabled:
        return cfg.federated.rounds * cfg.federated.local_steps * per_g
    return cfg.train.steps * per_g


def resolve_unit(unit: str, patients: int, images: int) -> str:
    """'auto' is patient-level whenever ids group images (fewer patients than images), else image-level."""
    if unit != "auto":
        return unit
    return "patient" if patients < images else "image"


@dataclass(frozen=True)
class DPPlan:
    """A hospital's DP-SGD setting, fixed before training: what the accountant will be created with."""

    unit: str
    units: int
    batch_size: int
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float
    noise_multiplier: float
    release_noise: float = 0.0  # σ of the one-off mean-image release (0: none), paid from the same budget

    def accountant(self) -> PrivacyAccountant:
        """A fresh accountant; the planned release is recorded up front, so that a crash can only over-count."""
        acc = PrivacyAccountant(self.sample_rate, self.noise_multiplier, self.delta, unit=self.unit, units=self.units)
        if self.release_noise:
            acc.record(*one_off_release(self.release_noise))
        return acc


def plan_dp(units: int, batch_size: int, steps: int, target_epsilon: float, delta: float = 0.0,
            unit: str = "patient", accountant: Accountant = "max", where: str = "",
            release_noise: float = 0.0) -> DPPlan:
    """Sampling rate = batch size / units, δ (0: :func:`default_delta`), σ calibrated to the target ε (with
    ``release_noise`` > 0, to what a one-off Gaussian release of that noise multiplier leaves of it)."""
    prefix = f"{where}: " if where else ""
    if units < 1:
        raise UserError(f"{prefix}no {unit}s to train on; give the hospital data or fewer hospitals")
    sample_rate = batch_size / units
    if sample_rate > 1:
        raise UserError(
            f"{prefix}sampling rate {batch_size}/{units} {unit}s = {sample_rate:.3g} is above 1; "
            f"set train.batch_size ≤ {units} or give the hospital more {unit}s"
        )
    delta = delta or default_delta(units)
    try:
        validate(sample_rate, None, delta, units)
        prior = [one_off_release(release_noise)] if release_noise else None
        sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant, prior)
    except UserError as exc:
        raise UserError(f"{prefix}{exc}") from None
    return DPPlan(unit, units, batch_size, sample_rate, steps, delta, target_epsilon, sigma, release_noise)
