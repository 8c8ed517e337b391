"""`medsyngan evaluate` commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this area's commands to the CLI (filled in by the issue that builds the area)."""
