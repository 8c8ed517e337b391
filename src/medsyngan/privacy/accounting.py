"""Privacy accounting: ε over a whole run under the replace-one relation, with a history that is never reset.

Why replace-one
---------------
A hospital's number of privacy units is public: the roster, the FedAvg weights and every hospital's plan (the
sampling rate q = batch / units) need it. Neighbouring datasets therefore have the same size, and the relation that
protects a patient is *replace one unit by another*. Opacus' accountants bound add/remove-one, which assumes the
size is secret; a dataset of known size and its add/remove neighbour are told apart for free. The reported ε is
replace-one; the add/remove figure (Opacus' RDP and PRV, the larger) is computed beside it as "add/remove-one".

The replace-one figure is Google's ``dp-accounting`` privacy-loss-distribution accountant
(``PLDAccountant(NeighborRel.REPLACE_ONE)``, pessimistic estimates: an upper bound, not an approximation) over
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` per private step, and ``GaussianDpEvent(σ)`` for a release at
q = 1. Its REPLACE convention: the two neighbouring outputs are the noise shifted by +s and by −s (the noise's
standard deviation is σ·s), i.e. the mechanism's replace-one sensitivity is 2s. Every mechanism here sums
per-unit contributions clipped to L2 norm C (DP-SGD's gradients, the mean image's deviations, client-level
updates) and adds N(0, σ²C²): replacing one unit by another moves the sum by at most ‖a − b‖ ≤ 2C, which is
dp-accounting's shift of ±C with s = C, so σ is passed as it is (tests/test_privacy_accounting.py checks, at
q = 1, that its ε equals the analytic Gaussian mechanism's at sensitivity 2C).

A hospital's accountant lives in its ledger (``privacy.session``) and is plain JSON (``state_dict``). It records
every private step as (noise multiplier, sampling rate, steps), run-length encoded, so a change of σ or q mid-run
is accounted for exactly.

The same class serves client-level DP-FedAvg (:func:`client_level_accountant`): there the unit is a hospital and
one step is one round, at q = 1.

The module is under 500 lines, more than the usual 400: the accountant, its calibration, the bounds on its work
(:data:`MIN_NOISE`, :data:`PRV_MAX_POINTS`) and a hospital's plan rest on the relation and conventions above, and
apart each would have to restate them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from medsyngan.config import Config
from medsyngan.errors import UserError

#: The neighbouring relation of the reported ε, as printed beside it.
RELATION = "replace-one"
ADD_REMOVE = "add/remove-one"
MECHANISMS = ("replace_one", "rdp", "prv")
STATE_VERSION = 1

#: δ never exceeds this, whatever the number of units; see :func:`default_delta`.
DELTA_CAP = 1e-5
#: Width of the privacy-loss grid. Pessimistic rounding keeps ε an upper bound at any width; at 1e-3 the bound is
#: within 0.1 % of the 1e-4 figure for the run lengths of this product and about 10× faster to compute.
PLD_DISCRETIZATION = 1e-3
#: Calibration gives up above this noise multiplier.
MAX_NOISE = 1e4
#: Smallest non-zero noise multiplier that is accounted. The privacy-loss grid's width grows as 1/σ²: at σ = 0.3 the
#: replace-one figure of 10 000 steps takes about 0.6 GB, at σ = 0.15 1.5 GB, at 0.03 over 4 GB for 200 steps (and
#: ε is then in the thousands or more, which protects nothing). A σ below it is refused, never accounted.
MIN_NOISE = 0.3
#: Opacus' PRV accountant discretises ±(RDP ε) at a mesh of 0.01 / √(steps · log(12 / δ′) / 2) and needs about
#: 200 bytes per point: 3 million points is about 0.6 GB. Past it the PRV figure is not computed and counts as ∞
#: (always an upper bound), so the add/remove figure is then ∞ too; the reported replace-one figure is unaffected.
PRV_MAX_POINTS = 3_000_000

History = list[tuple[float, float, int]]


def default_delta(units: int) -> float:
    """δ = min(1e-5, 1 / (2 · units)).

    δ bounds the probability that the guarantee fails outright; a δ of 1/units would allow a mechanism that
    publishes one unit's record in full. 1e-5 is far below that line for any hospital of up to 50 000 units; a
    larger hospital gets 1/(2 · units), half the line, so δ always stays clear of it.
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
    if noise_multiplier is not None and 0 < noise_multiplier < MIN_NOISE:
        raise UserError(_too_little_noise(noise_multiplier))
    if delta is not None:
        if not 0 < delta < 1:
            raise UserError(f"δ = {delta:g} must lie in (0, 1); 1e-5 is the usual choice")
        if units is not None and delta >= 1.0 / units:
            raise UserError(
                f"δ = {delta:g} is not below 1 / privacy units (1/{units} = {1.0 / units:.3g}): such a δ allows "
                f"leaking a whole record; set privacy.delta below {1.0 / units:.3g} or 0 for the default"
            )


def _too_little_noise(sigma: float) -> str:
    return (f"noise multiplier σ = {sigma:.3g} is below {MIN_NOISE:g}: its ε is in the thousands, which protects "
            "nothing, and accounting it takes gigabytes of memory; raise the noise (a smaller privacy.target_epsilon, "
            "privacy.mean_image_noise, privacy.label_noise or privacy.client_noise), or for an ablation without "
            "privacy set privacy.clip_only = true (σ = 0, ε = ∞)")


def _replace_one_epsilon(history: History, delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld.pld_privacy_accountant import NeighborRel, PLDAccountant

    accountant = PLDAccountant(NeighborRel.REPLACE_ONE, value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        gaussian = dp_event.GaussianDpEvent(sigma)
        accountant.compose(gaussian if q == 1 else dp_event.PoissonSampledDpEvent(q, gaussian), steps)
    return float(accountant.get_epsilon(delta))


def _add_remove_epsilon(history: History, delta: float, mechanism: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    accountant.history = list(history)
    if mechanism == "prv" and _prv_points(accountant, delta) > PRV_MAX_POINTS:
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is the largest one it tries (small-ε regime) and the PRV
        # discretisation divides by zero at q = 1; neither changes the returned bound's validity.
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def _prv_points(accountant, delta: float) -> int:
    """Points of the grid Opacus' PRV accountant would build for its history: the domain it computes from RDP
    (cheap) at the error levels its ``get_epsilon`` uses by default."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in accountant.history]
    domain = accountant._get_domain(prvs=prvs, num_self_compositions=[n for _, _, n in accountant.history],
                                    eps_error=0.01, delta_error=delta / 1000)
    return int(domain.size)


def epsilon_of(history: History, delta: float, mechanism: str = "replace_one") -> float:
    """ε of a history: 'replace_one' (the reported figure), or Opacus' add/remove-one 'rdp' or 'prv'.

    0 before any step and ∞ when any step added no noise (clipping only). A step whose σ is below
    :data:`MIN_NOISE` is refused (UserError): its accounting would need gigabytes.
    """
    history = [(float(s), float(q), int(n)) for s, q, n in history if n]
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, _ in history):
        return math.inf
    if (sigma := min(s for s, _, _ in history)) < MIN_NOISE:
        raise UserError(_too_little_noise(sigma))
    if mechanism == "replace_one":
        return _replace_one_epsilon(history, delta)
    if mechanism in ("rdp", "prv"):
        return _add_remove_epsilon(history, delta, mechanism)
    raise ValueError(f"unknown accountant {mechanism!r}; use one of {MECHANISMS}")


def epsilons(history: History, delta: float) -> dict[str, float]:
    """{'replace_one', 'rdp', 'prv', 'add_remove' (the larger of RDP and PRV), 'reported' (= replace_one)}."""
    eps = {m: epsilon_of(history, delta, m) for m in MECHANISMS}
    eps["add_remove"] = max(eps["rdp"], eps["prv"])
    eps["reported"] = eps["replace_one"]
    return eps


def describe(eps: dict[str, float], unit: str) -> str:
    """'ε = 1.00 (replace-one patient); add/remove-one 0.55'."""
    return (f"ε = {format_epsilon(eps['reported'])} ({RELATION} {unit}); {ADD_REMOVE} {format_epsilon(eps['add_remove'])}")


def format_epsilon(value: float, spec: str = ".2f") -> str:
    """ε as printed everywhere: ∞ for a run without noise (clipping only, or any step at σ = 0)."""
    return "∞" if math.isinf(value) else format(value, spec)


class PrivacyAccountant:
    """ε of one hospital (or of the client-level mechanism) over the whole run.

    ``step(n)`` charges n private steps at the current (σ, q); :meth:`set_mechanism` changes them for later steps
    without touching the past; :meth:`record` charges another Gaussian mechanism (a one-off release). The history
    only grows, except through :meth:`refund` of steps charged up front that verifiably did not run;
    :meth:`load_state_dict` refuses a state that would lose steps already charged.
    """

    def __init__(self, sample_rate: float, noise_multiplier: float, delta: float, *, unit: str = "patient",
                 units: int | None = None):
        validate(sample_rate, noise_multiplier, delta, units)
        self.sample_rate = float(sample_rate)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.unit = unit
        self.units = units
        self.history: History = []
        self._cache: tuple[tuple, dict[str, float]] | None = None

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
        """Charge ``steps`` runs of another Gaussian mechanism (e.g. a one-off release at q = 1) without changing
        the (σ, q) of later :meth:`step` calls."""
        validate(sample_rate, noise_multiplier, None, None)
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

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

    def refund(self, n: int) -> None:
        """Take back n of the steps last charged at the current (σ, q), which did not run (a round charged up
        front that stopped early in this process; a release recorded since then stays)."""
        if n <= 0:
            return
        mechanism = (self.noise_multiplier, self.sample_rate)
        i = next((i for i in reversed(range(len(self.history))) if self.history[i][:2] == mechanism), None)
        if i is None or self.history[i][2] < n:
            raise ValueError(f"cannot refund {n} steps: fewer were charged at the current (σ, q)")
        self.history[i] = (*mechanism, self.history[i][2] - n)
        if not self.history[i][2]:
            del self.history[i]

    def epsilon(self) -> dict[str, float]:
        """:func:`epsilons` of the history: 'reported' (replace-one), 'add_remove', 'replace_one', 'rdp', 'prv'."""
        key = tuple(self.history)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, epsilons(self.history, self.delta))
        return dict(self._cache[1])

    def replace_one_after(self, n: int = 0, extra: History | None = None) -> float:
        """Replace-one ε after n more steps and ``extra`` mechanisms, without the add/remove accountants."""
        history = list(self.history) + list(extra or [])
        if n:
            history.append((self.noise_multiplier, self.sample_rate, n))
        return epsilon_of(history, self.delta)

    def check_budget(self, target_epsilon: float, n: int, ledger: str = "") -> None:
        """Raise :class:`BudgetExceeded` when n more steps would take the reported ε above the target."""
        after = self.replace_one_after(n)
        if after > target_epsilon:
            where = f" (ledger {ledger})" if ledger else ""
            raise BudgetExceeded(
                f"{n} more private steps would spend ε = {after:.4g} ({RELATION}) > target {target_epsilon:g}; "
                f"spent so far {self.replace_one_after():.4g} after {self.steps} steps{where}; training stops here"
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

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PrivacyAccountant":
        acc = cls(state["sample_rate"], state["noise_multiplier"], state["delta"], unit=state["unit"],
                  units=state["units"])
        acc.load_state_dict(state)
        return acc


class BudgetExceeded(UserError):
    """The next private steps would exceed the hospital's ε budget: it refuses to train further."""


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: History | None = None) -> float:
    """The noise multiplier, within 0.5 % above the smallest, whose replace-one ε after ``steps`` is ≤ the target.

    ``prior``: mechanisms the same budget also pays for (history entries, e.g. the mean-image release); σ is then
    the smallest that keeps their composition with the steps within the target.
    """
    validate(sample_rate, None, delta)
    if target_epsilon <= 0:
        raise UserError(f"target ε = {target_epsilon:g} must be positive")
    if steps < 1:
        raise UserError(f"planned private steps = {steps}; calibration needs at least one step")
    prior = list(prior or [])
    if prior and (alone := epsilon_of(prior, delta)) >= target_epsilon:
        raise UserError(
            f"the one-off releases (mean image, label frequencies) alone spend ε = {alone:.3g} of the target "
            f"{target_epsilon:g}; raise privacy.mean_image_noise or privacy.label_noise, raise the target ε, or "
            "set privacy.mean_image_size=0 / train.label_source='public'"
        )

    def fits(sigma: float) -> bool:
        return epsilon_of(prior + [(sigma, sample_rate, steps)], delta) <= target_epsilon

    # Bracket from the add/remove RDP answer, which lies near: an evaluation far below the answer is slow (the
    # privacy loss of a nearly noiseless mechanism spans a wide grid), far above it cheap. The search never
    # evaluates below MIN_NOISE; a target that even MIN_NOISE meets is refused.
    high = max(_rdp_noise(target_epsilon, delta, sample_rate, steps), MIN_NOISE)
    if fits(high):
        while high / 2 > MIN_NOISE and fits(high / 2):
            high /= 2
        low = high / 2
        if low <= MIN_NOISE:
            if fits(MIN_NOISE):
                floor = epsilon_of(prior + [(MIN_NOISE, sample_rate, steps)], delta)
                raise UserError(
                    f"target ε = {target_epsilon:g} needs a noise multiplier below {MIN_NOISE:g} (σ = {MIN_NOISE:g} "
                    f"already gives ε = {floor:.4g} over {steps} steps at sampling rate {sample_rate:.3g}): such an ε "
                    "protects nothing and its accounting takes gigabytes of memory; set privacy.target_epsilon "
                    f"≤ {floor:.4g}, or for an ablation without privacy privacy.clip_only = true (σ = 0, ε = ∞)"
                )
            low = MIN_NOISE
    else:
        low = high
        while not fits(high):
            low, high = high, high * 2
            if high > MAX_NOISE:
                raise UserError(
                    f"target ε = {target_epsilon:g} cannot be met with δ = {delta:g}, sampling rate "
                    f"{sample_rate:g} and {steps} private steps; raise the target ε, plan fewer steps or lower "
                    "the batch size"
                )
    while high / low > 1.005:
        middle = (low * high) ** 0.5
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _rdp_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' add/remove RDP calibration: where the replace-one search starts (100 when RDP cannot certify the
    target at all, as below about ε = 0.1 at δ = 1e-5)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant="rdp"))
    except ValueError:
        return 100.0


def client_level_accountant(noise_multiplier: float, hospitals: int, delta: float = 0.0) -> PrivacyAccountant:
    """Accountant of DP-FedAvg (McMahan et al. 2018): unit = hospital, one step per round, q = 1.

    No amplification by sampling is claimed: the round's participants are a fixed-size sample drawn from the run's
    public seed, so which hospitals took part is known, and a hospital in the round is in it with certainty.
    The noise std on the sum of clipped updates is σ·C; replacing one hospital moves that sum by at most 2C.
    """
    if hospitals < 1:
        raise UserError(f"federated.hospitals = {hospitals}; client-level DP needs at least one hospital")
    delta = delta or default_delta(hospitals)
    return PrivacyAccountant(1.0, noise_multiplier, delta, unit="hospital", units=hospitals)


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
        """A fresh accountant: nothing charged yet (the session charges the release when it makes it)."""
        return PrivacyAccountant(self.sample_rate, self.noise_multiplier, self.delta, unit=self.unit, units=self.units)

    def history(self) -> History:
        """Everything the plan spends: the release (if any), then every planned step."""
        release = [one_off_release(self.release_noise)] if self.release_noise else []
        return release + [(self.noise_multiplier, self.sample_rate, self.steps)]

    def epsilon(self) -> dict[str, float]:
        """:func:`epsilons` of the whole plan."""
        return epsilons(self.history(), self.delta)


def plan_dp(units: int, batch_size: int, steps: int, target_epsilon: float, delta: float = 0.0,
            unit: str = "patient", where: str = "", release_noise: float = 0.0,
            min_noise: float = 0.0, clip_only: bool = False) -> DPPlan:
    """Sampling rate = batch size / units, δ (0: :func:`default_delta`), σ calibrated to the target replace-one ε
    (with ``release_noise`` > 0, to what a one-off Gaussian release of that noise multiplier leaves of it), and
    never below ``min_noise``.

    ``clip_only`` (privacy.clip_only, an ablation): σ = 0 and target ε = ∞, nothing calibrated; refused when
    ``min_noise`` > 0 (a hospital policy's floor on σ)."""
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
    if clip_only:
        if min_noise > 0:
            raise UserError(f"{prefix}privacy.clip_only = true trains with σ = 0, below the hospital policy's "
                            f"hospital.min_noise_multiplier = {min_noise:g}; set privacy.clip_only = false")
        validate(sample_rate, None, delta, units)
        return DPPlan(unit, units, batch_size, sample_rate, steps, delta, math.inf, 0.0, release_noise)
    try:
        validate(sample_rate, None, delta, units)
        prior = [one_off_release(release_noise)] if release_noise else None
        sigma = max(calibrate_noise(target_epsilon, delta, sample_rate, steps, prior), float(min_noise))
    except UserError as exc:
        raise UserError(f"{prefix}{exc}") from None
    return DPPlan(unit, units, batch_size, sample_rate, steps, delta, target_epsilon, sigma, release_noise)
