"""`medsyngan export`: the shareable generator of a run, with its model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import KeyOption, read_key


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        run: Annotated[Path, typer.Option("--run", help="Run directory (its latest checkpoint is exported).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the exported model.")],
        description: Annotated[Optional[str], typer.Option("--description", help="The training data in words, for the model card (source, licence; no patient detail).")] = None,
        key: KeyOption = None,
    ) -> None:
        """Write a shareable generator: its weights (EMA when kept), the configuration without paths or secrets,
        a model card and a sample grid; no discriminator, optimizer state, seeds, data statistics or keys."""
        from medsyngan.rundir import console
        from medsyngan.workflows.export import export_model

        card = export_model(run, out, read_key(key), description)
        guarantees = card["privacy"]["guarantees"]
        privacy = "; ".join(f"ε = {g['epsilon']:.3f}, δ = {g['delta']:.2g} per {g['unit']} ({g['relation']})"
                            for g in guarantees) or "no differential privacy"
        console.print(f"exported the {card['model']['weights']} of {run} to {out} ({privacy}); "
                      f"generate with: medsyngan generate --checkpoint {out} --out DIR", highlight=False,
                      soft_wrap=True)
