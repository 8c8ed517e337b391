"""A hospital's own privacy policy, and how it judges the aggregator's instructions.

The aggregator's configuration travels with every instruction (``privacy.dp``, ``target_epsilon``, ``encrypt``,
``secagg``, …), so on its own the aggregator would decide each hospital's privacy. A hospital therefore holds a
policy of its own (:class:`~medsyngan.config.HospitalSection`; fields and product defaults in
docs/configuration.md): a deployed hospital reads it from the TOML file named in ``--node-config policy=PATH``
(:func:`load_policy`; without one, the product defaults), never from the instruction; in a simulation the
``[hospital]`` section of the configuration is every virtual hospital's policy, and :func:`check_simulation`
refuses a configuration whose two halves disagree before anything starts.

On every instruction (hello and each round) the hospital calls :func:`check`: anything weaker than its policy is
refused with a one-line :class:`PolicyRefusal`, sent back as the error reply. A clipping-only instruction
(privacy.clip_only: σ = 0, ε = ∞) is weaker than any policy that asks for privacy (:func:`clip_only_refusals`).
Budgets are not refused but capped: it calibrates for the smaller of its ε and the instruction's, and the smaller
δ (:func:`effective_privacy`), and its ledger stops training when the next steps would pass its ε.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from pydantic import ValidationError

from medsyngan.config import Config, HospitalSection, PrivacySection
from medsyngan.errors import UserError
from medsyngan.privacy.accounting import DELTA_CAP

__all__ = ["HospitalSection", "PolicyRefusal", "check", "check_clip_only", "check_simulation", "clip_only_refusals",
           "effective_privacy", "load_policy", "refusals"]


class PolicyRefusal(UserError):
    """An instruction weaker than the hospital's policy; the message is the one-line reason."""


def load_policy(path: str | Path) -> HospitalSection:
    """A hospital's policy file: the fields of the ``[hospital]`` section, at the top level or under [hospital]."""
    path = Path(path)
    try:
        tree = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the hospital policy {path} ({exc.strerror}); fix --node-config policy=PATH")
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"hospital policy {path} is not valid TOML ({exc}); fix the file's syntax") from None
    tree = tree.get("hospital", tree)
    try:
        return HospitalSection.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UserError(f"hospital policy {path}: unknown key '{key}'; the keys are those of the [hospital] "
                            "section in docs/configuration.md") from None
        raise UserError(f"hospital policy {path}: bad value for '{key}': {first['msg']}") from None


def clip_only_refusals(policy: HospitalSection, privacy: PrivacySection) -> list[tuple[str, str]]:
    """(policy key, reason) for every part of the policy that a clipping-only run (privacy.clip_only: σ = 0,
    ε = ∞, no privacy) breaks; empty when it is no such run. Only a policy with dp_required = false,
    min_noise_multiplier = 0 and max_epsilon = inf allows one."""
    if not (privacy.dp and privacy.clip_only):
        return []
    what = "the instruction trains with clipping only and no noise (privacy.clip_only = true: ε = ∞, no privacy)"
    out = []
    if policy.dp_required:
        out.append(("dp_required", f"{what} but the hospital policy requires DP (hospital.dp_required = true)"))
    if policy.min_noise_multiplier > 0:
        out.append(("min_noise_multiplier", f"{what} but the hospital policy requires σ ≥ "
                                            f"hospital.min_noise_multiplier = {policy.min_noise_multiplier:g}"))
    if math.isfinite(policy.max_epsilon):
        out.append(("max_epsilon", f"{what} but the hospital policy spends at most hospital.max_epsilon = "
                                   f"{policy.max_epsilon:g} (only inf allows it)"))
    return out


def check_clip_only(policy: HospitalSection, privacy: PrivacySection) -> None:
    """Raise :class:`PolicyRefusal` when ``policy`` does not allow a clipping-only run (the centralized runner's
    check; a federated hospital's is part of :func:`check`)."""
    reasons = clip_only_refusals(policy, privacy)
    if reasons:
        key, reason = reasons[0]
        raise PolicyRefusal(f"{reason}; a clipping-only ablation needs hospital.{key} relaxed (dp_required = false, "
                            "min_noise_multiplier = 0, max_epsilon = inf), or set privacy.clip_only = false")


def refusals(policy: HospitalSection, cfg: Config, round_: int | None = None) -> list[tuple[str, str]]:
    """(policy key, reason) for every way the instruction ``cfg`` (and round) is weaker than the policy."""
    p, out = cfg.privacy, clip_only_refusals(policy, cfg.privacy)
    if policy.dp_required and not p.dp:
        out.append(("dp_required", "the instruction trains without DP (privacy.dp = false) but the hospital "
                                   "policy requires it (hospital.dp_required = true)"))
    if policy.encrypt_required and not p.encrypt:
        out.append(("encrypt_required", "the instruction sends updates unencrypted (privacy.encrypt = false) but "
                                        "the hospital policy requires encryption (hospital.encrypt_required = true)"))
    if policy.secagg_required and not p.secagg:
        out.append(("secagg_required", "the instruction sends updates outside secure aggregation (privacy.secagg = "
                                       "false) but the hospital policy requires it (hospital.secagg_required = true)"))
    if p.dp and p.max_grad_norm > policy.max_grad_norm:
        out.append(("max_grad_norm", f"privacy.max_grad_norm = {p.max_grad_norm:g} exceeds the hospital policy's "
                                     f"ceiling hospital.max_grad_norm = {policy.max_grad_norm:g}"))
    if p.dp and policy.unit == "patient" and p.unit == "image":
        out.append(("unit", "the instruction asks for image-level DP (privacy.unit = 'image') but the hospital "
                            "policy protects patients (hospital.unit = 'patient')"))
    if policy.max_rounds:
        if cfg.federated.rounds > policy.max_rounds:
            out.append(("max_rounds", f"the federation plans federated.rounds = {cfg.federated.rounds}, more than "
                                      f"the hospital policy allows (hospital.max_rounds = {policy.max_rounds})"))
        elif round_ is not None and round_ > policy.max_rounds:
            out.append(("max_rounds", f"round {round_} is past the hospital policy's hospital.max_rounds = "
                                      f"{policy.max_rounds}"))
    return out


def check(policy: HospitalSection, cfg: Config, hospital: int, round_: int | None = None) -> None:
    """Raise :class:`PolicyRefusal` naming every reason the hospital refuses this instruction."""
    reasons = refusals(policy, cfg, round_)
    if reasons:
        raise PolicyRefusal(f"hospital {hospital} refuses: " + "; ".join(reason for _, reason in reasons))


def effective_privacy(policy: HospitalSection, privacy: PrivacySection) -> PrivacySection:
    """The privacy settings the hospital trains with: the smaller ε and δ, and its unit when the instruction
    leaves it open ('auto')."""
    if privacy.delta:
        delta = min(privacy.delta, policy.max_delta)
    else:
        # 0 means min(1e-5, 1 / (2 · units)), which a policy allowing 1e-5 or more already accepts.
        delta = 0.0 if policy.max_delta >= DELTA_CAP else policy.max_delta
    unit = policy.unit if privacy.unit == "auto" and policy.unit == "patient" else privacy.unit
    return privacy.model_copy(update={"target_epsilon": min(privacy.target_epsilon, policy.max_epsilon),
                                      "delta": delta, "unit": unit})


def check_simulation(cfg: Config) -> None:
    """A simulation's virtual hospitals take their policy from ``cfg.hospital``; a configuration they would refuse,
    or whose ε or δ they would cap, is a one-line error naming the key, before anything starts."""
    policy, p = cfg.hospital, cfg.privacy
    reasons = refusals(policy, cfg)
    if reasons:
        key, reason = reasons[0]
        raise UserError(f"{reason}; set hospital.{key} to match, or change the privacy setting")
    if p.dp and p.target_epsilon > policy.max_epsilon:
        raise UserError(f"privacy.target_epsilon = {p.target_epsilon:g} exceeds hospital.max_epsilon = "
                        f"{policy.max_epsilon:g}, the most the hospitals spend; set hospital.max_epsilon="
                        f"{p.target_epsilon:g} or lower privacy.target_epsilon")
    if p.dp and p.delta > policy.max_delta:
        raise UserError(f"privacy.delta = {p.delta:g} exceeds hospital.max_delta = {policy.max_delta:g}; set "
                        f"hospital.max_delta={p.delta:g} or lower privacy.delta")
