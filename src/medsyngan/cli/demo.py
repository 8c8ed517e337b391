"""`medsyngan demo`: the end-to-end federated, private demo (see :mod:`medsyngan.workflows.demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import SetOption


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the demo's runs, report and summary (default: a new runs/demo-TIMESTAMP).")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="About a minute: tiny phantoms, a few short rounds.")] = False,
        data: Annotated[Optional[Path], typer.Option("--data", help="Your prepared dataset (with train_val/test splits) instead of phantoms.")] = None,
        set_: SetOption = None,
    ) -> None:
        """Federated DCGAN-64 across simulated hospitals with patient-level DP (ε = 1), quantized, encrypted,
        securely aggregated updates; a centralized non-private twin; evaluation of both and one report."""
        import os

        os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
        import time

        from medsyngan.workflows.demo import run_demo

        # A fresh folder per demo, so that running it again never touches an earlier demo's files.
        out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
        run_demo(out, quick=quick, data=data, overrides=set_ or [])
