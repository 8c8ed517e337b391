"""`medsyngan config`: show the resolved configuration and the schema reference."""

from __future__ import annotations

import typer

from medsyngan.cli.options import ConfigOption, SetOption


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect configurations: presets, overrides and the schema.", no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("show")
    def show(config: ConfigOption = None, set_: SetOption = None) -> None:
        """Print the resolved configuration (preset + overrides) as TOML."""
        from medsyngan.config import load_config

        typer.echo(load_config(config, set_ or []).to_toml())

    @config_app.command("reference")
    def reference() -> None:
        """Print the configuration reference (every section and key) as Markdown."""
        from medsyngan.config import schema_markdown

        typer.echo(schema_markdown())
