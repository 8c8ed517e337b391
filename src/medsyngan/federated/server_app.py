"""The Flower ServerApp of the aggregator, built by :func:`make_server_app`. Thin: it resolves the run from
Flower's run config and hands the grid to :class:`~medsyngan.federated.server.RoundDriver`.

How a run config becomes a run (a preset to resolve, or a job prepared beforehand) is the caller's: the
composition above this layer passes it in as ``setup``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medsyngan.config import Config
from medsyngan.errors import UserError
from medsyngan.federated.hospital_keys import HospitalKeys
from medsyngan.federated.protocol import Job
from medsyngan.rundir import RunDir

log = logging.getLogger("medsyngan.federated")


@dataclass(frozen=True)
class ServerSetup:
    """What the aggregator needs to run one federation."""

    cfg: Config
    run_dir: RunDir
    job: Job
    resume: bool
    identity_key: str | None  # the aggregator's X25519 identity key file, when updates are encrypted
    hospital_keys: HospitalKeys | None = None  # deployment: which SuperNode key is which hospital


def make_server_app(setup: Callable[[Mapping[str, Any]], ServerSetup]) -> ServerApp:
    """A ServerApp that runs the federation ``setup`` makes of the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from medsyngan.federated.server import RoundDriver

        try:
            run = setup(context.run_config)
            RoundDriver(run.cfg, run.run_dir, run.job, run.resume, run.identity_key, run.hospital_keys).run(grid)
        except UserError as exc:
            # One line in run.log and the run's log; Flower then records the run as failed, with this reason.
            log.error("federation stopped: %s", exc)
            raise

    return app
