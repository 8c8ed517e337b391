"""`medsyngan`: the command line. Each area registers its commands from its own module; heavy imports
(torch, flwr) happen inside the commands so that `--help` stays fast."""

from __future__ import annotations

import sys

import typer

from medsyngan.errors import UserError

app = typer.Typer(
    name="medsyngan",
    help="Federated, differentially private GANs for synthetic chest X-rays.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    from medsyngan.cli import config_cmd, data, demo, evaluate, export, hospital, pki, privacy, train

    for module in (data, train, evaluate, export, privacy, pki, hospital, demo, config_cmd):
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: a UserError becomes one red line and exit status 2, never a traceback."""
    try:
        if app(standalone_mode=False) == 130:  # how typer reports Ctrl-C (or SIGTERM in a federation) here
            raise KeyboardInterrupt
    except UserError as exc:
        from medsyngan.rundir import console

        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        from medsyngan.rundir import console

        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
