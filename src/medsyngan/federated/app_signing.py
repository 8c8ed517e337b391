"""Signed app bundles: the federation's operator signs what a run will execute and how it is configured, and a
hospital verifies that signature before it installs or imports anything from the bundle.

Flower 1.42's own check (`flower-supernode --trusted-entities`) accepts only bundles whose verifications the Flower
Hub filled in (``valid_license``), which a bundle submitted with `flwr run` never has, so MedSynGAN signs its own:

    signed message  = DOMAIN, newline, canonical JSON of {fab-sha256, run-config, signed-at}
    app-signature   = "v1:<signed-at>:<Ed25519 signature, base64url>"   (a run-config value, given to `flwr run`)

``fab-sha256`` is the SHA-256 of the Flower App Bundle exactly as `flwr run` builds and Flower installs it (every
file, and the app's default configuration); ``run-config`` is the run's whole configuration as a hospital's
SuperNode fuses it (the bundle's defaults with the run's overrides), less ``app-signature`` itself. Neither the code
nor the settings of a signed run (preset, overrides, mode, run directory) can change without the federation's key.
``signed-at`` limits how long an unused signature stays good (:data:`MAX_AGE_S`), and each hospital binds a
signature to the first Flower run that presents it (:class:`SignatureLedger`), so a recorded signature cannot start
a second run.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from medsyngan.errors import UserError

SIGNATURE_KEY = "app-signature"  # the run-config key that carries the signature
DOMAIN = b"medsyngan app bundle and run config, v1"
MAX_AGE_S = 24 * 3600  # a signature must be first used within a day of signing
CLOCK_SKEW_S = 300  # how far in the future a signing time may lie (clocks of signer and hospital differ)


class BundleRefused(Exception):
    """A bundle or run configuration that this hospital will not run; the message says why in one line."""


def build_fab(app_dir: Path) -> bytes:
    """The Flower App Bundle of ``app_dir`` byte for byte as `flwr run` builds it (Flower's build is deterministic:
    sorted files, fixed timestamps), so that what is signed here is what the hospitals receive."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise UserError(f"{app_dir} has no pyproject.toml; give the Flower app's directory")
    try:
        return build_fab_from_disk(app_dir)
    except Exception as exc:  # Flower raises ValueError and click exceptions for a bad app
        raise UserError(f"cannot build the app bundle of {app_dir}: {exc}") from None


def fused_run_config(fab: bytes, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The run config a SuperNode gives the ClientApp: the bundle's defaults with ``overrides``, through Flower's
    own function, so that signer and hospital see the same values."""
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.run import Run

    run = Run.create_empty(0)
    run.override_config = dict(overrides)
    try:
        return dict(get_fused_config_from_fab(fab, run))
    except ValueError as exc:
        raise UserError(f"run config does not fit the app: {exc}") from None


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signed_message(fab_sha256: str, run_config: Mapping[str, Any], signed_at: int) -> bytes:
    """The bytes the federation key signs."""
    config = {k: v for k, v in run_config.items() if k != SIGNATURE_KEY}
    try:
        body = _canonical({"fab-sha256": fab_sha256, "run-config": config, "signed-at": signed_at})
    except (TypeError, ValueError) as exc:
        raise BundleRefused(f"the run config holds a value that cannot be signed ({exc})") from None
    return DOMAIN + b"\n" + body


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except FileNotFoundError:
        raise UserError(f"signing key {path} not found; it is federation_app.key from `medsyngan pki init`") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise UserError(f"{path} is not a private key ({exc}); give federation_app.key from `medsyngan pki init`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 key; give federation_app.key from `medsyngan pki init`")
    return key


def load_federation_public(path: Path) -> ed25519.Ed25519PublicKey:
    """The federation's app-signing key as a hospital pins it (an OpenSSH ``ssh-ed25519`` line)."""
    from medsyngan.federated.pki import load_openssh_public_key

    hint = "copy federation_app.pub from the operator's trust/ folder (`medsyngan pki init`)"
    key = load_openssh_public_key(path, "federation key", hint)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UserError(f"{path} is not an Ed25519 key; {hint}")
    return key


def sign(key: ed25519.Ed25519PrivateKey, fab: bytes, run_config: Mapping[str, Any],
         now: float | None = None) -> str:
    """The ``app-signature`` value for running ``fab`` with ``run_config`` (the fused config)."""
    signed_at = int(time.time() if now is None else now)
    try:
        message = signed_message(hashlib.sha256(fab).hexdigest(), run_config, signed_at)
    except BundleRefused as exc:
        raise UserError(str(exc)) from None
    signature = base64.urlsafe_b64encode(key.sign(message)).rstrip(b"=").decode()
    return f"v1:{signed_at}:{signature}"


def sign_app(key_path: Path, app_dir: Path, overrides: Mapping[str, Any], now: float | None = None) -> str:
    """Sign the app in ``app_dir`` run with ``overrides`` (what `flwr run --run-config` gets, without the
    signature): the operator's side of the check."""
    if SIGNATURE_KEY in overrides:
        raise UserError(f"the run config already holds {SIGNATURE_KEY}; give it without the old signature")
    key = load_signing_key(key_path)
    fab = build_fab(app_dir)
    return sign(key, fab, fused_run_config(fab, overrides), now)


@dataclass(frozen=True)
class Signature:
    signed_at: int
    digest: str  # SHA-256 of the signature value: what the hospital's ledger records


def verify(public_key: ed25519.Ed25519PublicKey, fab: bytes, run_config: Mapping[str, Any]) -> Signature:
    """Check the run config's ``app-signature`` against ``fab`` and the rest of the run config; raises
    BundleRefused naming what is wrong. Nothing of ``fab`` is read but its bytes."""
    value = run_config.get(SIGNATURE_KEY)
    if not isinstance(value, str) or not value:
        raise BundleRefused("the run carries no app-signature: only bundles signed with the federation's key "
                            "(`medsyngan pki sign-app`) run here")
    version, _, rest = value.partition(":")
    stamp, _, encoded = rest.partition(":")
    if version != "v1" or not stamp.isdigit() or not encoded:
        raise BundleRefused("the run's app-signature is malformed (expected v1:<time>:<signature>)")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        public_key.verify(raw, signed_message(hashlib.sha256(fab).hexdigest(), run_config, int(stamp)))
    except (InvalidSignature, ValueError):
        raise BundleRefused("the app bundle or its run config does not match its signature, or it was signed "
                            "with another key than this hospital's federation_app.pub") from None
    return Signature(int(stamp), hashlib.sha256(value.encode()).hexdigest())


class SignatureLedger:
    """A hospital's record of which Flower run each signature admitted: a signature starts one run, within
    MAX_AGE_S of signing; every later message of that run is admitted whatever the signature's age."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The ledger's content under an exclusive lock (ClientApp processes of one node may run concurrently);
        what the block leaves in it is written back atomically."""
        from medsyngan.rundir import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                entries = json.loads(self.path.read_text()) if self.path.is_file() else {}
            except ValueError:
                raise BundleRefused(f"the signature ledger {self.path} is damaged; restore it or move it away "
                                    "(every run then needs a fresh signature)") from None
            before = dict(entries)
            yield entries
            if entries != before:
                atomic_write_text(self.path, json.dumps(entries, indent=1, sort_keys=True))

    def admit(self, signature: Signature, run_id: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._locked() as entries:
            seen = entries.get(signature.digest)
            if seen is not None:
                if int(seen["run"]) != run_id:
                    raise BundleRefused(f"this app-signature already started Flower run {seen['run']}; sign each "
                                        "run anew (`medsyngan pki sign-app`)")
                return
            age = now - signature.signed_at
            if age > MAX_AGE_S:
                raise BundleRefused(f"the app-signature is {age / 3600:.1f} h old and was never used here; a signature "
                                    f"must start its run within {MAX_AGE_S // 3600} h: sign the run anew")
            if age < -CLOCK_SKEW_S:
                raise BundleRefused("the app-signature was made in the future; check the clocks of the signer and "
                                    "this hospital")
            entries[signature.digest] = {"run": run_id, "signed_at": signature.signed_at, "first_used": int(now)}


@dataclass(frozen=True)
class AppTrust:
    """What a hospital checks before running a bundle: the federation key it pins, and its signature ledger."""

    federation_public: Path
    ledger: Path

    def check(self, fab: bytes, run_config: Mapping[str, Any], run_id: int) -> None:
        signature = verify(load_federation_public(self.federation_public), fab, run_config)
        SignatureLedger(self.ledger).admit(signature, run_id)
