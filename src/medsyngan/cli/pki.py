"""`medsyngan pki` commands: the operator's CA, SuperLink certificate and keys; each hospital's own key pair; the
manifest that ties a hospital's public key to its id; signatures of the app bundles hospitals may run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    pki_app = typer.Typer(help="Keys, certificates and app signatures for a real deployment.", no_args_is_help=True)
    app.add_typer(pki_app, name="pki")

    @pki_app.command("init")
    def init(
        out: Annotated[Path, typer.Option("--out", help="Directory to create (must not exist or be empty).")],
        host: Annotated[str, typer.Option("--host", help="The SuperLink's DNS name or IP address, as hospitals dial it.")],
        force: Annotated[bool, typer.Option("--force", help="Replace an existing PKI directory.")] = False,
    ) -> None:
        """On the aggregator's machine: a CA, the SuperLink TLS certificate, the aggregator's X25519 identity key
        and the federation's app-signing key; private keys are written 0600. Hospitals make their own keys
        (`pki hospital-init`)."""
        from medsyngan.federated.pki import init_pki

        pki = init_pki(out, host, force=force)
        typer.echo(f"PKI for {host} written to {pki.root} (see {pki.manifest})")
        typer.echo(f"  SuperLink: {pki.server_cert.name}, {pki.server_key.name}, {pki.ca_cert.name}")
        typer.echo(f"  ship {pki.trust_dir}/ to every hospital; keep {pki.federation_key.name} where runs are signed")

    @pki_app.command("hospital-init")
    def hospital_init(
        out: Annotated[Path, typer.Option("--out", help="The hospital's key folder to create.")],
        hospital_id: Annotated[int, typer.Option("--id", help="This hospital's id, as agreed with the operator.")],
    ) -> None:
        """On the hospital's own machine: its SuperNode key pair. Send only auth.pub to the operator."""
        from medsyngan.federated.hospital_keys import hospital_init as make

        hospital = make(out, hospital_id)
        typer.echo(f"hospital {hospital_id}: key pair in {hospital.root}; send {hospital.auth_pub} to the operator")
        typer.echo(f"  fingerprint {hospital.info()['public_key_fingerprint']}")

    @pki_app.command("add-hospital")
    def add_hospital(
        pki_dir: Annotated[Path, typer.Option("--pki", help="The PKI folder from `pki init`.")],
        hospital_id: Annotated[int, typer.Option("--id", help="The hospital's id.")],
        public_key: Annotated[Path, typer.Option("--public-key", help="The auth.pub the hospital sent.")],
    ) -> None:
        """On the aggregator's machine: record which public key is hospital ID. Compare the fingerprint printed
        with the one the hospital reads from its hospital.json, over a channel you trust."""
        from medsyngan.federated.hospital_keys import add_hospital as add
        from medsyngan.federated.pki import Pki

        pki = Pki(pki_dir)
        digest = add(pki, hospital_id, public_key)
        typer.echo(f"hospital {hospital_id}: {pki.hospital_pub(hospital_id)} added to {pki.manifest}")
        typer.echo(f"  fingerprint {digest}")

    @pki_app.command("sign-app")
    def sign_app(
        key: Annotated[Path, typer.Option("--key", help="federation_app.key from `pki init`.")],
        app_dir: Annotated[Path, typer.Option("--app", help="The Flower app folder that `flwr run` submits.")],
        run_config: Annotated[str, typer.Option("--run-config", help="The --run-config text given to `flwr run`.")],
    ) -> None:
        """Print `app-signature='…'`: append it to the same --run-config of `flwr run`. Hospitals run only an app
        bundle and run config signed with the federation's key, each signature for one run."""
        from flwr.common.config import parse_config_args

        from medsyngan.errors import UserError
        from medsyngan.federated.app_signing import SIGNATURE_KEY
        from medsyngan.federated.app_signing import sign_app as sign

        try:
            overrides = parse_config_args([run_config])
        except ValueError as exc:
            raise UserError(f"--run-config {run_config!r} is not what `flwr run` accepts ({exc})") from None
        typer.echo(f"{SIGNATURE_KEY}='{sign(key, app_dir, overrides)}'")
