"""Options shared by several commands, so that every entry point reads configuration the same way."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ConfigOption = Annotated[
    Optional[str],
    typer.Option("--config", "-c", help="TOML preset: a path or a name from configs/ (e.g. dcgan64)."),
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting: section.key=value (repeatable)."),
]
