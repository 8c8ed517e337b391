"""`medsyngan pki` commands: the federation's CA, SuperLink certificate and hospital keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    pki_app = typer.Typer(help="Keys and certificates for a real deployment (TLS + SuperNode auth).", no_args_is_help=True)
    app.add_typer(pki_app, name="pki")

    @pki_app.command("init")
    def init(
        out: Annotated[Path, typer.Option("--out", help="Directory to create (must not exist or be empty).")],
        host: Annotated[str, typer.Option("--host", help="The SuperLink's DNS name or IP address, as hospitals dial it.")],
        hospitals: Annotated[int, typer.Option("--hospitals", help="Number of hospitals (one key pair each).")],
        force: Annotated[bool, typer.Option("--force", help="Replace an existing PKI directory.")] = False,
    ) -> None:
        """Create a CA, the SuperLink TLS certificate, one SuperNode key pair per hospital and the aggregator's
        X25519 identity key; private keys are written 0600."""
        from medsyngan.federated.pki import init_pki

        pki = init_pki(out, host, hospitals, force=force)
        typer.echo(f"PKI for {host} with {hospitals} hospital(s) written to {pki.root} (see {pki.root}/manifest.json)")
        typer.echo(f"  SuperLink: {pki.server_cert.name}, {pki.server_key.name}, {pki.ca_cert.name}")
        typer.echo(f"  ship {pki.hospital_dir(0).parent}/hospital-K/ to hospital K (auth.key stays there)")
