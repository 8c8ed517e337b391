"""A Flower app run on Flower's supported local simulation, in the foreground: a private SuperLink in simulation
mode on loopback, the app submitted to it with `flwr run`, and every process stopped by PID at the end.

Why not in this process: Flower 1.42 deprecates ``flwr.simulation.run_simulation``, its in-process entry point
(it prints a deprecation banner), in favour of `flwr run`. For a local simulation `flwr run` talks to a SuperLink
started with ``--simulation``; that SuperLink starts a SuperExec, which starts ``flwr-simulation``; that process
installs the app bundle, loads the ServerApp and ClientApp *by name* (``[tool.flwr.app.components]``) and runs
them on Ray. ``flwr.simulation.run_simulation_process`` is the body of that process, not an in-process API: it
pulls its inputs from a SuperLink's Runtime API and ends with ``sys.exit``. What remains in-process is the private
``flwr.simulation.run_simulation._run_simulation``, which no release promises to keep. So the apps run where
Flower runs them, and they learn what to run from the run config alone.

Processes: the SuperLink and `flwr run` share this process's process group, so Ctrl-C at the terminal or a kill of
the group reaches them at once; SuperExec and ``flwr-simulation`` (sessions of their own) follow their parent
within a fraction of a second, and Ray's processes follow ``flwr-simulation``. On a normal end, an error, Ctrl-C
or SIGTERM, everything ever seen below them is stopped by PID (SIGTERM, then SIGKILL after a grace period).

The terminal shows the aggregator's ``run.log`` as the ServerApp writes it. Flower's own output (SuperLink,
simulation, Ray, tracebacks) goes to ``superlink.log`` and ``flwr-run.log`` in the Flower folder; a failed run
becomes one :class:`~medsyngan.errors.UserError` with the reason Flower recorded.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medsyngan.errors import UserError
from medsyngan.federated import deploy
from medsyngan.federated.processes import ManagedProcess, executable, flower_env, free_port, start_process, stop_all
from medsyngan.rundir import atomic_write_text

log = logging.getLogger("medsyngan.federated")
CONNECTION = "local-simulation"
POLL_S = 0.5


def write_app(folder: Path, name: str, version: str, components: Mapping[str, str],
              config: Mapping[str, Any]) -> Path:
    """A Flower app folder holding only its pyproject.toml: the components are imported from the installed
    packages, so the bundle `flwr run` builds from it is this one small file."""
    import tomli_w

    doc = {
        "project": {"name": name, "version": version, "description": f"{name} on Flower's local simulation",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": name, "components": dict(components), "config": dict(config)}}},
    }
    atomic_write_text(folder / "pyproject.toml", tomli_w.dumps(doc))
    return folder


class LogFollower:
    """Passes on the lines another process appends to a log file, from the size it had when following began."""

    def __init__(self, path: Path, echo: Callable[[str], None]):
        self.path, self.echo = path, echo
        self.offset = path.stat().st_size if path.is_file() else 0
        self.partial = b""

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.echo(line.decode(errors="replace"))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does (processes stopped), instead of killing this process alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_local_simulation(home: Path, app_dir: Path, run_config: Mapping[str, Any],
                         federation_config: Mapping[str, Any], follow: LogFollower,
                         env: Mapping[str, str] | None = None, startup_timeout: float = 120.0) -> None:
    """Run the app in ``app_dir`` on a private local SuperLink whose Flower home is ``home``; returns when the run
    completed, raises UserError with Flower's reason when it did not."""
    home.mkdir(parents=True, exist_ok=True)
    environment = {**flower_env(home), **(env or {})}
    processes: list[ManagedProcess] = []
    with _sigterm_as_interrupt():
        try:
            port = free_port()
            superlink = start_process("superlink", [
                executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
            ], home / "superlink.log", environment, own_session=False)
            superlink.last = True
            processes.append(superlink)
            if superlink.wait_for(deploy.SUPERLINK_READY, startup_timeout) is None:
                raise UserError(f"Flower's local SuperLink exited during start-up; see {superlink.log_path}: "
                                f"{superlink.log_tail(1)}")
            deploy.write_connection(home, f"127.0.0.1:{port}", None, CONNECTION)
            run = start_process("flwr-run", [
                executable("flwr"), "run", str(app_dir), CONNECTION, "--stream",
                "--run-config", deploy.run_config_arg(dict(run_config)),
                "--federation-config", deploy.run_config_arg(dict(federation_config)),
            ], home / "flwr-run.log", environment, own_session=False)
            processes.append(run)
            while run.alive():
                for proc in processes:
                    proc.track()
                follow.poll()
                if not superlink.alive():
                    raise UserError(f"Flower's local SuperLink stopped during the run; see {superlink.log_path}")
                time.sleep(POLL_S)
            follow.poll()
            _check_outcome(environment, run)
        finally:
            left = stop_all(processes)
            if left:
                log.error("processes of the local simulation still running after SIGKILL: %s", left)


def _last_message(text: str) -> str:
    """The last line of a CLI's output that says something (not the frame of its error box)."""
    lines = (line.strip(" │╭╮╰╯─") for line in reversed(text.splitlines()))
    return next((line for line in lines if any(c.isalnum() for c in line)), "no output")


def _check_outcome(env: Mapping[str, str], run: ManagedProcess) -> None:
    """The status Flower recorded for the one run on this SuperLink: nothing when it completed, else UserError."""
    listed = subprocess.run([executable("flwr"), "ls", CONNECTION, "--format", "json"], env=dict(env), text=True,
                            capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    try:
        runs = json.loads(listed.stdout[listed.stdout.index("{"):])["runs"]
    except (ValueError, KeyError):
        runs = []
    if not runs:
        raise UserError(f"`flwr run` submitted no run ({_last_message(run.log_text())}); see {run.log_path}")
    status, details = str(runs[-1].get("status", "")), str(runs[-1].get("status-details", ""))
    if status == "finished:completed":
        return
    reason = details.split("exception: ", 1)[-1] if details else f"Flower reports the run as {status or 'unknown'}"
    raise UserError(f"{reason} (Flower's log of the run: {run.log_path})")
