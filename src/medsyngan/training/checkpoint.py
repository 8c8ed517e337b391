"""Checkpoints: one folder per save, written atomically, with a ``latest`` pointer written last.

Layout::

    checkpoints/
      step-000500/
        model.safetensors   G., D., G_ema. tensors; the safetensors header also carries the metadata JSON, so this
                            one file is enough for `medsyngan generate --checkpoint FILE`
        train_state.pt      optimizer moments, path-length mean, the trainer's RNG (torch.save, weights_only-safe)
        meta.json           architecture, resolution, configuration TOML, step, kimg, ProGAN stage, RNG states of
                            torch/numpy/python, the data loader's state, and SHA-256 of the two files above
      latest                the name of the newest complete folder

A folder is assembled under a hidden temporary name and renamed into place, then ``latest`` is replaced: a crash
at any moment leaves the previous checkpoint intact and pointed to. Only the newest ``keep`` folders are kept.

Encryption at rest (``privacy.checkpoint_key``): the three files are sealed with AES-256-GCM under the run's key
file (:mod:`medsyngan.sealed`), each bound to its role, so nothing of the weights, optimizer moments, RNG or
accountant state is readable on disk. ``latest`` (a folder name) stays plain. Readers recognise sealed files by
their header and take the key from the caller (``--key FILE``) or from the ``config.toml`` of the run the
checkpoint belongs to.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medsyngan.config import Config, config_from_toml_text
from medsyngan.errors import UserError
from medsyngan.rundir import RunDir, atomic_write_text, sha256_file
from medsyngan.sealed import IntegrityError, decrypt_at_rest, encrypt_at_rest, is_encrypted, load_key_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
LATEST_FILE = "latest"
_META_KEY = "medsyngan"
# Centralized runs save step-NNNNNN folders, federated runs round-NNNNN folders; both are snapshots of a run.
_SNAPSHOT_DIR = re.compile(r"^(?:step|round)-(\d+)$")


# ---------------------------------------------------------------------- JSON encoding of tensors and RNG states
def _encode(value: Any) -> Any:
    """JSON-safe form of nested dicts/lists holding tensors and numpy arrays (tensors → base64 of raw bytes)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "b64": base64.b64encode(raw).decode()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape),
                "b64": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            dtype = getattr(torch, value["__tensor__"])
            raw = bytearray(base64.b64decode(value["b64"]))
            flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            return flat.view(dtype).reshape(value["shape"]).clone()
        if "__ndarray__" in value:
            arr = np.frombuffer(base64.b64decode(value["b64"]), dtype=np.dtype(value["__ndarray__"]))
            return arr.reshape(value["shape"]).copy()
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def capture_rng() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and python, JSON-safe."""
    state: dict[str, Any] = {
        "torch": _encode(torch.get_rng_state()),
        "numpy": _encode(list(np.random.get_state())),
        "python": _encode(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_decode(state["torch"]))
    name, keys, pos, has_gauss, cached = _decode(state["numpy"])
    np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = _decode(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in state["cuda"]])


# ---------------------------------------------------------------------- keys
def checkpoint_key(cfg: Config) -> bytes | None:
    """The key that seals this run's checkpoints (``privacy.checkpoint_key``), or None for plaintext checkpoints.

    Load it once when a run starts: a missing or wrong-size key file is then a one-line error before training."""
    return load_key_file(cfg.privacy.checkpoint_key) if cfg.privacy.checkpoint_key else None


def _role(name: str) -> str:
    """The associated data of a sealed checkpoint file: its role, not its path, so a checkpoint folder can be
    copied or a lone model.safetensors renamed, but weights cannot be passed off as training state."""
    return f"checkpoint/{name}"


# ---------------------------------------------------------------------- writing


def _write_synced(path: Path, data: bytes, key: bytes | None = None) -> None:
    if key is not None:
        data = encrypt_at_rest(data, key, _role(path.name))
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
) -> Path:
    """Write one checkpoint folder ``checkpoints_dir/name`` atomically and point ``latest`` at it.

    ``tensors``: flat name → tensor (saved as safetensors); ``meta``: JSON-safe metadata (tensors inside are encoded);
    ``state``: anything ``torch.load(weights_only=True)`` can read back (optimizer state dicts, counters);
    ``key``: seal every file with it (:func:`checkpoint_key`); the recorded SHA-256 are those of the sealed bytes.
    """
    from safetensors.torch import save as st_save

    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=checkpoints_dir))
    try:
        meta = {"format": FORMAT_VERSION, "created": time.time(), **_encode(meta)}
        header = {k: v for k, v in meta.items() if k in ("format", "arch", "resolution", "z_dim", "step", "kimg",
                                                         "stage_resolution", "alpha", "config_toml", "parts",
                                                         "labels")}
        weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _write_synced(tmp / WEIGHTS_FILE, st_save(weights, metadata={_META_KEY: json.dumps(header)}), key)
        files = {WEIGHTS_FILE: sha256_file(tmp / WEIGHTS_FILE)}
        if state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            _write_synced(tmp / STATE_FILE, buf.getvalue(), key)
            files[STATE_FILE] = sha256_file(tmp / STATE_FILE)
        meta["files"] = files
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=1).encode(), key)
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
) -> Path:
    """Checkpoint a :class:`~medsyngan.training.step.GANTrainer` together with global RNG and data-loader state
    (sealed with ``key`` when given)."""
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
    return save_checkpoint_files(checkpoints_dir, step_name(trainer.step), full["models"], meta, state, keep, key)


# ---------------------------------------------------------------------- reading
class _KeyRing:
    """Opens the files of one checkpoint: plain ones as they are, sealed ones with the caller's key, else the key
    file named by the ``config.toml`` of the run the checkpoint lies in (looked up at the first sealed file)."""

    def __init__(self, target: Path, key: bytes | None):
        self.target = target
        self._given = [(key, "the key given")] if key is not None else []
        self._from_run: list[tuple[bytes, str]] | None = None
        self._run_problem = ""

    def _run_key(self) -> list[tuple[bytes, str]]:
        folder = next((f for f in self.target.resolve().parents if f.name == "checkpoints"), None)
        run = RunDir(folder.parent) if folder is not None else None
        if run is None or not run.config_path.is_file():
            return []
        key_file = run.load_config().privacy.checkpoint_key
        if not key_file:
            return []
        where = f"key file {key_file} (privacy.checkpoint_key of {run.config_path})"
        if not Path(key_file).is_file():
            self._run_problem = f"; its run names {where}, which is not found here"
            return []
        return [(load_key_file(key_file), where)]

    def open(self, file: Path, role: str) -> bytes:
        blob = file.read_bytes()
        if not is_encrypted(blob):
            return blob
        if self._from_run is None:
            self._from_run = self._run_key()
        keys = self._given + self._from_run
        if not keys:
            raise UserError(f"checkpoint {file} is encrypted; pass --key FILE, the key file it was written with "
                            f"(privacy.checkpoint_key of its run){self._run_problem}")
        for key, _ in keys:
            try:
                return decrypt_at_rest(blob, key, _role(role))
            except IntegrityError as exc:
                if exc.reason == "malformed":
                    raise _corrupt(file, exc) from None
        tried = " or ".join(name for _, name in keys)
        raise UserError(f"checkpoint {file} does not decrypt with {tried}: wrong key file, or the file was altered; "
                        f"pass the key file it was written with (--key FILE){self._run_problem}")


@dataclass
class Checkpoint:
    """A checkpoint found on disk; ``tensors`` and ``meta`` are read eagerly, the training state on demand."""

    path: Path  # the folder, or the lone safetensors file
    meta: dict[str, Any]
    tensors: dict[str, Tensor]
    keys: _KeyRing | None = field(default=None, repr=False)

    def config(self) -> Config:
        return config_from_toml_text(self.meta["config_toml"], f"{self.path} (embedded configuration)")

    def training_state(self) -> dict[str, Any]:
        file = self.path / STATE_FILE if self.path.is_dir() else None
        if file is None or not file.is_file():
            raise UserError(f"{self.path}: no {STATE_FILE} (training state); resume needs a full checkpoint folder")
        keys = self.keys or _KeyRing(self.path, None)
        try:
            return torch.load(io.BytesIO(keys.open(file, STATE_FILE)), map_location="cpu", weights_only=True)
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
    """A run dir, its checkpoints/ folder, a step folder or a .safetensors file → the checkpoint to read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint path {path} does not exist; pass a run directory or a checkpoint folder/file")
    if path.is_file():
        return path
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
    keys = _KeyRing(target, key)
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
    return _decode(loader) if loader is not None else None
