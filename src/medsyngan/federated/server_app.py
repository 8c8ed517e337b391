"""Flower ServerApp: the aggregator. Thin: it resolves the run and hands the grid to :class:`Aggregator`.

``medsyngan train`` builds the app in-process with :func:`make_server_app`. ``flwr run .`` (Simulation or
Deployment Engine) uses the module-level ``app``, configured by the run config of ``pyproject.toml``
(``[tool.flwr.app.config]``): ``config`` (preset), ``overrides`` (space-separated ``section.key=value``),
``run-dir``, ``resume``, ``aggregator-key`` (the X25519 identity key from ``medsyngan pki init``, needed when
updates are encrypted) and ``mode`` (``simulation``: the server prepares the data and partition for the virtual
hospitals; ``deployment``: each hospital brings its own ``data-path``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.federated.server import Aggregator
from medsyngan.rundir import RunDir


def make_server_app(cfg: Config, run_dir: RunDir, job: Mapping[str, Any], resume: bool,
                    identity_key: str | None) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        Aggregator(cfg, run_dir, job, resume, identity_key).run(grid)

    return server


log = logging.getLogger("medsyngan.federated")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from medsyngan.federated.run import prepare_federation

    run_config = context.run_config
    overrides = str(run_config.get("overrides", "")).split()
    cfg, run_dir, job = prepare_federation(
        preset=str(run_config["config"]),
        overrides=overrides,
        run_dir=str(run_config["run-dir"]),
        resume=bool(run_config.get("resume", False)),
        simulation=str(run_config.get("mode", "simulation")) == "simulation",
    )
    key = str(run_config.get("aggregator-key", "")) or None
    try:
        Aggregator(cfg, run_dir, job, bool(run_config.get("resume", False)), key).run(grid)
    except UserError as exc:
        # `flwr run` shows the ServerApp's log; one clear line reads better there than a traceback.
        log.error("federation stopped: %s", exc)
        raise SystemExit(2) from None
