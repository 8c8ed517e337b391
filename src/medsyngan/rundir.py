"""The run directory: one folder per run that every later command can pick up.

Layout::

    RUN_DIR/
      config.toml     the resolved configuration, with its format version (older versions are migrated on reading)
      run_id          a random id made when the run starts, kept across resumes: bound into every sealed file
      checkpoints/    model + optimizer + RNG state, written atomically
      metrics.jsonl   one JSON object per logged step / round
      samples/        sample grids from fixed latents
      run.log         everything the terminal showed
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from medsyngan.config import Config, config_from_toml_text
from medsyngan.errors import UserError

console = Console(stderr=True)
log = logging.getLogger("medsyngan")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to the terminal through rich and, when given, to a plain-text file (the run's run.log)."""
    root = logging.getLogger("medsyngan")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_medsyngan", False):
            root.removeHandler(handler)
            handler.close()
    term = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    term._medsyngan = True  # type: ignore[attr-defined]
    root.addHandler(term)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._medsyngan = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.propagate = False


def progress() -> Progress:
    """The progress bar used for anything longer than a few seconds: count, bar, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    def create(self, config: Config, *, resume: bool = False) -> "RunDir":
        """Start a run here, or (resume) check that the saved configuration is the one asked for."""
        if resume:
            if not self.config_path.is_file():
                raise UserError(f"{self.root}: no config.toml to resume from; start the run without --resume")
        elif self.config_path.exists() and any(self.checkpoints.glob("*")):
            raise UserError(
                f"{self.root} already holds a run with checkpoints; pass --resume to continue it "
                "or choose another --out"
            )
        for folder in (self.root, self.checkpoints, self.samples):
            folder.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(self.config_path, config.to_toml())
            self.new_run_id()
        setup_logging(self.log_path)
        return self

    @property
    def run_id_path(self) -> Path:
        return self.root / "run_id"

    def run_id(self) -> str:
        """The run's id (made on first use when the run has none yet); stable across resumes."""
        if self.run_id_path.is_file():
            return self.run_id_path.read_text().strip()
        return self.new_run_id()

    def new_run_id(self) -> str:
        """A fresh id for a run that starts here (a resume keeps the old one)."""
        run_id = uuid.uuid4().hex
        atomic_write_text(self.run_id_path, run_id + "\n")
        return run_id

    def load_config(self) -> Config:
        if not self.config_path.is_file():
            raise UserError(f"{self.root} is not a run directory (no config.toml); pass the folder given to --out")
        return config_from_toml_text(self.config_path.read_text(), str(self.config_path))

    def append_metrics(self, row: dict[str, Any]) -> None:
        row = {"time": round(time.time(), 3), **row}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
            fh.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    # A run killed mid-write leaves at most one torn last line; keep everything before it.
                    break
        return rows

    def truncate_metrics_after(self, key: str, value: float) -> None:
        """On resume, drop rows logged after the checkpoint we restart from, so no step appears twice."""
        kept = [r for r in self.read_metrics() if r.get(key, -1) <= value]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
