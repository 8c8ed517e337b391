"""Checkpoints: one folder per save, written atomically, with a ``latest`` pointer written last.

Layout::

    checkpoints/
      step-000500/
        model.safetensors   G., D., G_ema. tensors; the safetensors header also carries the metadata JSON, so this
                            one file is enough for `medsyngan generate --checkpoint FILE`
        train_state.pt      optimizer moments, path-length mean, the trainer's RNG (torch.save, weights_only-safe)
        secret.bin          (DP runs) the secret seed and position of the DP sampling and noise streams, always
                            sealed: see :func:`run_secret_key`
        meta.json           architecture, resolution, configuration TOML, step, kimg, ProGAN stage, RNG states of
                            torch/numpy/python, the data loader's state, the public part of the DP state (accountant
                            history, σ, q: ε is readable), and SHA-256 of the files above
      latest                the name of the newest complete folder

A folder is assembled under a hidden temporary name and renamed into place, then ``latest`` is replaced: a crash
at any moment leaves the previous checkpoint intact and pointed to. Only the newest ``keep`` folders are kept.

Encryption at rest (``privacy.checkpoint_key``): every file is sealed with AES-256-GCM under the run's key file
(:mod:`medsyngan.sealed`), bound to the run id (``RUN/run_id``), the step (or round) and its role, so nothing of
the weights, optimizer moments, RNG or accountant state is readable on disk, and a file from another run, step or
role is refused. ``latest`` (a folder name) stays plain. Readers recognise sealed files by their header and take
the key from the caller (``--key FILE``), from the ``config.toml`` of the run the checkpoint belongs to, or from
that run's own key file (``RUN/keys/checkpoint.key``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medsyngan.config import Config, config_from_toml_text
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text, sha256_file
from medsyngan.sealed import Binding, encrypt_at_rest, ensure_key_file, load_key_file
from medsyngan.training.checkpoint_keys import RUN_KEY, KeyRing, role
from medsyngan.training.state_json import capture_rng, decode_json, encode_json, restore_rng

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
SECRET_FILE = "secret.bin"
META_FILE = "meta.json"
LATEST_FILE = "latest"
MODEL_CARD_JSON = "model-card.json"  # beside model.safetensors: a model folder written by `medsyngan export`
_META_KEY = "medsyngan"
# Centralized runs save step-NNNNNN folders, federated runs round-NNNNN folders; both are snapshots of a run.
_SNAPSHOT_DIR = re.compile(r"^(?:step|round)-(\d+)$")


# ---------------------------------------------------------------------- keys
def checkpoint_key(cfg: Config) -> bytes | None:
    """The key that seals this run's checkpoints (``privacy.checkpoint_key``), or None for plaintext checkpoints.

    Load it once when a run starts: a missing or wrong-size key file is then a one-line error before training."""
    return load_key_file(cfg.privacy.checkpoint_key) if cfg.privacy.checkpoint_key else None


def run_secret_key(run_root: Path, key: bytes | None) -> bytes:
    """The key that seals a run's secrets (the DP sampling and noise seed): ``key`` (the run's
    ``privacy.checkpoint_key``) when there is one, else the run's own key file ``RUN/keys/checkpoint.key``,
    created (0600, logged) on first use.

    Why create a key rather than refuse to train: the secret must never be written in plaintext, and a DP run
    without ``privacy.checkpoint_key`` is the common case (presets, demo, study); refusing would make every one of
    them a keygen step first, for no gain over a key the run makes itself. The key lies outside ``checkpoints/``,
    so a checkpoint folder that is copied or shared carries nothing from which the noise can be rebuilt, while
    its ``meta.json`` still shows ε. It does not protect against whoever holds the whole run directory: for that,
    keep a ``privacy.checkpoint_key`` elsewhere (then every file is sealed with it).
    """
    return key if key is not None else load_key_file(run_key_file(run_root))


def run_key_file(run_root: Path) -> Path:
    """The run's own key file ``RUN/keys/checkpoint.key``, created (0600, logged) on first use."""
    path = Path(run_root) / RUN_KEY
    ensure_key_file(path, "this run's DP secrets (the seeds of its sampling and noise) at rest")
    return path


def _snapshot_step(name: str) -> int:
    match = _SNAPSHOT_DIR.match(name)
    if match is None:
        raise ValueError(f"checkpoint folder name {name!r} is not step-NNNNNN or round-NNNNN")
    return int(match.group(1))


def _keyring(target: Path, key: bytes | None) -> KeyRing:
    """The keys of the checkpoint at ``target`` (a folder, or a file in one), held to the run whose
    ``checkpoints/`` holds its folder and to the step its folder's name says; a lone file to its role only."""
    folder = target if target.is_dir() else target.parent
    if _SNAPSHOT_DIR.match(folder.name) is None:
        return KeyRing(key, None, None)
    return KeyRing(key, RunDir(folder.resolve().parent.parent), _snapshot_step(folder.name))


# ---------------------------------------------------------------------- writing


def weights_bytes(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    """A safetensors file of ``tensors`` whose header carries what a reader needs of ``meta`` to build the
    networks (architecture, resolution, configuration, …), so that the weights file alone can be sampled from."""
    from safetensors.torch import save as st_save

    header = {k: v for k, v in meta.items() if k in ("format", "arch", "resolution", "z_dim", "step", "kimg",
                                                     "stage_resolution", "alpha", "config_toml", "parts", "labels")}
    weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return st_save(weights, metadata={_META_KEY: json.dumps(header)})


def _write_synced(path: Path, data: bytes, key: bytes | None, run_id: str, step: int) -> None:
    if key is not None:
        data = encrypt_at_rest(data, key, Binding(run_id, step, role(path.name)))
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint_files(
    checkpoints_dir: Path,
    name: str,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    state: dict[str, Any] | None = None,
    keep: int = 3,
    key: bytes | None = None,
    secret: dict[str, Any] | None = None,
    secret_key: bytes | None = None,
) -> Path:
    """Write one checkpoint folder ``checkpoints_dir/name`` (step-NNNNNN or round-NNNNN) atomically and point
    ``latest`` at it.

    ``tensors``: flat name → tensor (saved as safetensors); ``meta``: JSON-safe metadata (tensors inside are encoded);
    ``state``: anything ``torch.load(weights_only=True)`` can read back (optimizer state dicts, counters);
    ``key``: seal every file with it (:func:`checkpoint_key`); the recorded SHA-256 are those of the sealed bytes;
    ``secret``: JSON-safe values that are never written in plaintext, sealed with ``secret_key``
    (:func:`run_secret_key`). Sealed files are bound to the run id of ``checkpoints_dir``'s parent (the run
    directory), the step in ``name`` and their role.
    """
    if secret is not None and secret_key is None:
        raise ValueError("a checkpoint's secret is only ever written sealed; pass secret_key")
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    step = _snapshot_step(name)
    run_id = RunDir(checkpoints_dir.parent).run_id()
    final = checkpoints_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=checkpoints_dir))
    try:
        meta = {"format": FORMAT_VERSION, "created": time.time(), **encode_json(meta)}
        files = {}
        blobs = {WEIGHTS_FILE: (weights_bytes(tensors, meta), key)}
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            blobs[STATE_FILE] = (buf.getvalue(), key)
        if secret is not None:
            blobs[SECRET_FILE] = (json.dumps(encode_json(secret)).encode(), secret_key)
        for file_name, (data, file_key) in blobs.items():
            _write_synced(tmp / file_name, data, file_key, run_id, step)
            files[file_name] = sha256_file(tmp / file_name)
        meta["files"] = files
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=1).encode(), key, run_id, step)
        if final.exists():
            # Re-saving a step (after a resume) replaces the old folder; move it aside first so the rename is atomic.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=checkpoints_dir))
            os.replace(final, stale / name)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(checkpoints_dir / LATEST_FILE, name + "\n")
    _prune(checkpoints_dir, keep, protect=name)
    return final


def snapshot_dirs(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoint folders of a run (steps or rounds), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    dirs = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _SNAPSHOT_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: int(_SNAPSHOT_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def _prune(checkpoints_dir: Path, keep: int, protect: str) -> None:
    for old in snapshot_dirs(checkpoints_dir)[:-keep] if keep > 0 else []:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_trainer_checkpoint(
    checkpoints_dir: Path,
    trainer: Any,
    cfg: Config,
    loader_state: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    keep: int = 3,
    key: bytes | None = None,
    secret: dict[str, Any] | None = None,
    secret_key: bytes | None = None,
) -> Path:
    """Checkpoint a :class:`~medsyngan.training.step.GANTrainer` together with global RNG and data-loader state
    (sealed with ``key`` when given; ``secret`` and ``secret_key`` as in :func:`save_checkpoint_files`)."""
    full = trainer.state_dict()
    counters = full["counters"]
    meta = {
        "arch": cfg.model.arch,
        "resolution": cfg.model.resolution,
        "z_dim": cfg.model.z_dim,
        "parts": list(trainer.networks()),
        **counters,
        "config_toml": cfg.to_toml(),
        "rng": capture_rng(),
        "loader": loader_state,
        **(extra_meta or {}),
    }
    state = {k: v for k, v in full.items() if k != "models"}
    return save_checkpoint_files(checkpoints_dir, step_name(trainer.step), full["models"], meta, state, keep, key,
                                 secret, secret_key)


# ---------------------------------------------------------------------- reading
@dataclass
class Checkpoint:
    """A checkpoint found on disk; ``tensors`` and ``meta`` are read eagerly, the training state and the secret
    on demand."""

    path: Path  # the folder, or the lone safetensors file
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    keys: KeyRing | None = field(default=None, repr=False)

    def config(self) -> Config:
        return config_from_toml_text(self.meta["config_toml"], f"{self.path} (embedded configuration)")

    def _read(self, name: str, what: str) -> bytes:
        file = self.path / name if self.path.is_dir() else None
        if file is None or not file.is_file():
            raise UserError(f"{self.path}: no {name} ({what}); resume needs a full checkpoint folder")
        return (self.keys or _keyring(self.path, None)).open(file, name)

    def training_state(self) -> dict[str, Any]:
        try:
            return torch.load(io.BytesIO(self._read(STATE_FILE, "training state")), map_location="cpu",
                              weights_only=True)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise _corrupt(self.path, exc) from None

    def secret(self) -> dict[str, Any]:
        """What ``save_checkpoint_files`` was given as ``secret`` (e.g. the DP session's seed and sampler)."""
        try:
            return decode_json(json.loads(self._read(SECRET_FILE, "the sealed DP secret")))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise _corrupt(self.path, exc) from None

    def part(self, name: str) -> dict[str, Tensor]:
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def check_matches(self, cfg: Config) -> None:
        """One-line error when the checkpoint is of another architecture or resolution than ``cfg``."""
        arch, res = self.meta.get("arch"), self.meta.get("resolution")
        if arch != cfg.model.arch or res != cfg.model.resolution:
            raise UserError(
                f"{self.path} holds a {arch} model at {res} px but the configuration asks for "
                f"{cfg.model.arch} at {cfg.model.resolution} px; use the run's own configuration or another checkpoint"
            )


def _corrupt(path: Path, exc: BaseException) -> UserError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"checkpoint {path} is corrupt or incomplete ({reason}); delete it to fall back to an earlier one")


def resolve_checkpoint(path: Path | str) -> Path:
    """A run dir, its checkpoints/ folder, a step folder, a model folder written by `medsyngan export` or a
    .safetensors file → the checkpoint to read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist; pass a run directory or a checkpoint folder/file")
    if path.is_file():
        return path
    if (path / MODEL_CARD_JSON).is_file() and (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    if (path / META_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = folder / LATEST_FILE
    if latest.is_file():
        target = folder / latest.read_text().strip()
        if target.is_dir():
            return target
    candidates = snapshot_dirs(folder)
    if not candidates:
        raise UserError(f"no checkpoint found in {path}; train first or pass a checkpoint folder/file")
    return candidates[-1]


def _read_weights(data: bytes) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """(metadata from the safetensors header or None, tensors) of a safetensors file's bytes."""
    from safetensors.torch import load

    size = int.from_bytes(data[:8], "little")
    header = (json.loads(data[8:8 + size]).get("__metadata__") or {}).get(_META_KEY)
    return (json.loads(header) if header is not None else None), load(data)


def load_checkpoint(path: Path | str, key: bytes | None = None) -> Checkpoint:
    """Read a checkpoint; any damage (missing file, bad hash, unreadable data) is one clear UserError.

    Sealed files open with ``key`` (e.g. from ``--key FILE``) or with the key file that the ``config.toml`` of
    the checkpoint's run names; a missing or wrong key is a UserError naming the file.
    """
    target = resolve_checkpoint(path)
    keys = _keyring(target, key)
    try:
        if target.is_file():
            meta, tensors = _read_weights(keys.open(target, WEIGHTS_FILE))
            if meta is None:
                raise ValueError("not a MedSynGAN checkpoint (no metadata in the safetensors header)")
            return Checkpoint(target, meta, tensors, keys)
        meta_path = target / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{META_FILE} missing")
        meta = json.loads(keys.open(meta_path, META_FILE))
        for name, digest in meta.get("files", {}).items():
            file = target / name
            if not file.is_file():
                raise FileNotFoundError(f"{name} missing")
            if sha256_file(file) != digest:
                raise ValueError(f"{name} does not match its recorded SHA-256")
        return Checkpoint(target, meta, _read_weights(keys.open(target / WEIGHTS_FILE, WEIGHTS_FILE))[1], keys)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise _corrupt(target, exc) from None


def restore_trainer(trainer: Any, ckpt: Checkpoint) -> dict[str, Any] | None:
    """Load weights, optimizer, counters and global RNG into ``trainer``; returns the saved data-loader state."""
    state = ckpt.training_state()
    try:
        trainer.load_state_dict({"models": ckpt.tensors, **state})
    except (RuntimeError, KeyError) as exc:
        raise UserError(
            f"{ckpt.path} does not fit this model ({str(exc).splitlines()[0]}); resume with the run's own configuration"
        ) from None
    restore_rng(ckpt.meta["rng"])
    loader = ckpt.meta.get("loader")
    return decode_json(loader) if loader is not None else None
