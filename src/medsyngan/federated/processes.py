"""Flower's processes, started and stopped by PID: the environment they run in, and a managed process that
remembers every process below it (Flower starts SuperExec, ServerApp, ClientApp, simulation and Ray processes
itself, some in sessions of their own), so that stopping leaves nothing running.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import medsyngan
from medsyngan.errors import UserError


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process: its own FLWR_HOME (apps, config.toml), never a runtime
    `uv sync` of app dependencies (it would install a CUDA torch) nor an online update check, this interpreter's
    scripts first on PATH because SuperLink and SuperNode start `flower-superexec` by name, and this very
    `medsyngan` first on PYTHONPATH: the apps run in processes with other working directories, where a relative
    PYTHONPATH would pick up another copy."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    package_root = str(Path(medsyngan.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise UserError(f"{name} not found next to {sys.executable}; install flwr[simulation]==1.42.0 in this environment")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# --- processes -----------------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, …, starttime at index 19)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """All processes below `pid` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


# A process is (pid, start time): a pid recorded earlier may since belong to someone else's process.
Proc = tuple[int, str]


def _identity(pid: int) -> Proc | None:
    fields = _stat(pid)
    return (pid, fields[19]) if fields is not None else None


def is_running(proc: Proc) -> bool:
    """True while this very process is alive; a zombie (exited, not yet reaped) counts as gone."""
    fields = _stat(proc[0])
    return fields is not None and fields[19] == proc[1] and fields[0] != "Z"


def _kill(proc: Proc, sig: int) -> None:
    if is_running(proc):
        try:
            os.kill(proc[0], sig)
        except ProcessLookupError:
            pass


@dataclass
class ManagedProcess:
    """A Flower process, its output in `log_path`: in its own session (Linux), or in its starter's process group
    (`own_session` False), so that a signal to that group (Ctrl-C, a kill of the group) reaches it too."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    last: bool = False  # stopped after all others (the SuperLink)
    seen: set[Proc] = field(default_factory=set)
    own_session: bool = True
    log_start: int = 0  # where this process's output begins in a log file that earlier runs appended to

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        """What this process wrote to its log."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_start)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def track(self) -> set[Proc]:
        """Remember this process and every process below it (they may be orphaned by the time we stop)."""
        for pid in {self.pid} | (descendants(self.pid) if self.alive() else set()):
            if (ident := _identity(pid)) is not None:
                self.seen.add(ident)
        return self.seen

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float) -> re.Match[str] | None:
        """Poll the log until `pattern` appears; None when the process exits without it."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            self.track()
            exited = not self.alive()
            if match := regex.search(self.log_text()):
                return match
            if exited:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {regex.pattern!r} in {self.log_path} after {timeout:.0f} s")
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.alive():
            self.track()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still running after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)
        return int(self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL the process and everything below it at once, as a crash or power loss would."""
        for proc in sorted(self.track()):
            _kill(proc, signal.SIGKILL)
        self.popen.wait()

    def terminate(self) -> None:
        """SIGTERM the process (its whole group when it has a session of its own): Flower shuts down cleanly (a
        SuperNode ends its session at the SuperLink, the SuperLink stops its SuperExec and ServerApp)."""
        self.track()
        if self.alive():
            try:
                if self.own_session:
                    os.killpg(self.pid, signal.SIGTERM)
                else:
                    os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def running(self) -> bool:
        return any(is_running(proc) for proc in self.track())

    def kill_leftovers(self) -> None:
        for proc in sorted(self.seen):
            _kill(proc, signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def leftovers(self) -> list[int]:
        return sorted(pid for pid, start in self.seen if is_running((pid, start)))


def start_process(name: str, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None,
                  own_session: bool = True) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        start = log.tell()
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=own_session,
        )
    proc = ManagedProcess(name, popen, log_path, own_session=own_session, log_start=start)
    proc.track()
    return proc


def stop_all(processes: Iterable[ManagedProcess], grace: float = 10.0, reap: float = 10.0) -> list[int]:
    """SIGTERM everything, SIGKILL what is still running after `grace` seconds; returns the pids still running
    `reap` seconds after that (should be none: a large process takes a moment to die even of SIGKILL). SuperLinks
    go last, so that SuperNodes can still end their sessions there."""
    procs = list(processes)
    for wave in ([p for p in procs if not p.last], [p for p in procs if p.last]):
        for proc in wave:
            proc.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(proc.running() for proc in wave):
            time.sleep(0.2)
        for proc in wave:
            proc.kill_leftovers()
    deadline = time.monotonic() + reap
    while (left := sorted({pid for proc in procs for pid in proc.leftovers()})) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


