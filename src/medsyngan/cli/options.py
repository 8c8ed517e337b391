"""Options shared by several commands, so that every entry point reads configuration the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOption = Annotated[
    Optional[str],
    typer.Option("--config", "-c", help="TOML preset: a path, or the name of a shipped preset (e.g. dcgan64)."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting: section.key=value (repeatable)."),
]
KeyOption = Annotated[
    Optional[Path],
    typer.Option("--key", help="Key file of an encrypted checkpoint (default: the run's privacy.checkpoint_key)."),
]


def read_key(path: Path | None) -> bytes | None:
    """The bytes of a --key file, or None to let the checkpoint's own run name its key."""
    from medsyngan.sealed import load_key_file

    return load_key_file(path) if path is not None else None
