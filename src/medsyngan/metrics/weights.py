"""Finding pretrained weight files: an explicit path, an environment variable, the torch hub cache, our cache,
and finally a download from the standard URL (verified by checksum) when the machine is online.

Nothing here trains or fine-tunes: the files are the published ones, so that a metric computed here is the
metric other papers report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medsyngan.errors import UserError
from medsyngan.rundir import sha256_file
from medsyngan.runtime import cache_dir


@dataclass(frozen=True)
class WeightFile:
    """A published weight file.

    ``filenames`` are the names the file is known by (the first is the canonical one, used for downloads);
    ``sha256_prefix`` is the hash prefix that torch-hub convention puts in the file name, checked after a
    download; None where the publisher gives no hash.
    """

    label: str
    filenames: tuple[str, ...]
    url: str
    env_var: str
    sha256_prefix: str | None


def hub_checkpoint_dir() -> Path:
    """torch hub's cache (``$TORCH_HOME/hub/checkpoints``), where pytorch-fid and torch-fidelity leave files."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def weights_cache_dir() -> Path:
    return cache_dir() / "weights"


def _offline() -> bool:
    return os.environ.get("MEDSYNGAN_OFFLINE", "") not in ("", "0")


def _from_explicit(spec: WeightFile, given: Path, origin: str) -> Path:
    if given.is_dir():
        for name in spec.filenames:
            if (given / name).is_file():
                return given / name
        raise UserError(f"{origin} {given} is a folder without {' or '.join(spec.filenames)}; put the file there")
    if not given.is_file():
        raise UserError(f"{origin} {given} does not exist; point it at {spec.filenames[0]} ({spec.url})")
    return given


def _download(spec: WeightFile, timeout_s: float) -> Path:
    target = weights_cache_dir() / spec.filenames[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=timeout_s) as response:
            shutil.copyfileobj(response, out)
        if spec.sha256_prefix is not None:
            digest = sha256_file(Path(tmp))
            if not digest.startswith(spec.sha256_prefix):
                raise UserError(
                    f"download of {spec.url} has SHA-256 {digest[:12]}…, expected {spec.sha256_prefix}…; "
                    f"the file is corrupt or not the published one — download it by hand into {target.parent}"
                )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def missing_message(spec: WeightFile) -> str:
    return (
        f"{spec.label} weights not found: get {spec.filenames[0]} from {spec.url} and put it in "
        f"{hub_checkpoint_dir()} (or {weights_cache_dir()}), or set {spec.env_var}=/path/to/file"
    )


def resolve(spec: WeightFile, path: str | Path | None = None, download_timeout_s: float = 20.0) -> Path:
    """Return the path of the weight file, downloading it only when nothing local is found and we are online.

    Order: ``path`` argument, ``$<env_var>``, torch hub cache, medsyngan cache, download (unless
    ``MEDSYNGAN_OFFLINE=1``). A miss raises one UserError that names the file, the URL and where to put it.
    """
    if path is not None:
        return _from_explicit(spec, Path(path).expanduser(), "weight path")
    env = os.environ.get(spec.env_var)
    if env:
        return _from_explicit(spec, Path(env).expanduser(), f"${spec.env_var} =")
    for folder in (hub_checkpoint_dir(), weights_cache_dir()):
        for name in spec.filenames:
            if (folder / name).is_file():
                return folder / name
    if _offline():
        raise UserError(missing_message(spec) + " (MEDSYNGAN_OFFLINE is set, so no download was tried)")
    try:
        return _download(spec, download_timeout_s)
    except OSError as exc:
        raise UserError(missing_message(spec) + f" (download failed: {exc})") from None
