"""`medsyngan hospital start`: a hospital's node in a real deployment, which runs only app bundles signed with the
federation's key (:mod:`medsyngan.federated.hospital_node`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    hospital_app = typer.Typer(help="A hospital's node in a real deployment.", no_args_is_help=True)
    app.add_typer(hospital_app, name="hospital")

    @hospital_app.command("start")
    def start(
        hospital_dir: Annotated[Path, typer.Option(
            "--hospital-dir", help="The folder from `pki hospital-init`, with ca.crt, aggregator_x25519.pub and "
                                   "federation_app.pub copied from the operator's trust/ folder.")],
        superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink's Fleet API.")],
        data_path: Annotated[Path, typer.Option("--data-path", help="The hospital's prepared dataset.")],
        home: Annotated[Path, typer.Option("--home", help="This node's Flower home: installed bundles, its secret, "
                                                          "its ledger of app signatures.")],
        port: Annotated[int, typer.Option("--port", help="The SuperNode's Runtime API port (loopback only).")] = 9094,
        state_dir: Annotated[Optional[Path], typer.Option(
            "--state-dir", help="Where the hospital keeps its training state across rounds.")] = None,
        state_key: Annotated[Optional[Path], typer.Option(
            "--state-key", help="Key file that seals that state (`medsyngan privacy keygen`); needed for DP.")] = None,
        policy: Annotated[Optional[Path], typer.Option(
            "--policy", help="The hospital's privacy policy (TOML, the [hospital] keys of docs/configuration.md); "
                             "default: the product defaults.")] = None,
    ) -> None:
        """Start the hospital's SuperNode and serve it as its SuperExec: every task's app bundle and run config
        must carry a valid signature by the federation's key, or the task is refused before anything of the
        bundle is installed or imported. Ctrl-C stops both."""
        from medsyngan.federated.hospital_keys import HospitalDir
        from medsyngan.federated.hospital_node import HospitalNode

        node = HospitalNode(HospitalDir(hospital_dir), superlink, data_path, home, port, state_dir, state_key, policy)
        raise typer.Exit(node.run())
