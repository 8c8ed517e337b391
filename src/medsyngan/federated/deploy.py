"""Launching a real Flower 1.42 federation: SuperLink, hospital registration, SuperNodes and `flwr run`.

Used by `scripts/deploy/*` and by the loopback integration test, so that what the guide documents is what the
test runs. Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink over one HTTPS port
(`--host/--port`); SuperNode authentication is `--enable-supernode-auth` plus `flwr supernode register` of each
hospital's public key over the Control API; the `flwr` CLI finds the SuperLink through a named connection in
`$FLWR_HOME/config.toml` (never through `[tool.flwr.federations]`, which `flwr run` would migrate by rewriting
the app's pyproject.toml).

Every process is started in its own session and stopped with everything it spawned: the SuperLink starts a
SuperExec in a *separate* session (which then starts `flwr-serverapp`), and each SuperNode starts a SuperExec
that starts `flwr-clientapp`, so killing one process group is not enough.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from medsyngan.errors import UserError

CONNECTION = "medsyngan"

_READY_SUPERLINK = re.compile(r"Uvicorn running on https?://")
_READY_SUPERNODE = re.compile(r"SuperNode ID: (\d+)")
_SUPERNODE_REFUSED = re.compile(r"Failed to activate SuperNode|Exit Code: 305")


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for every Flower process: its own FLWR_HOME (apps, config.toml), never a runtime
    `uv sync` of app dependencies (it would install a CUDA torch), and this interpreter's scripts first on
    PATH because SuperLink and SuperNode start `flower-superexec` by name."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise UserError(f"{name} not found next to {sys.executable}; install flwr[simulation]==1.42.0 in this environment")
    return str(path)


def require_files(**paths: Path) -> None:
    """One-line error for the first missing file, before anything starts."""
    for what, path in paths.items():
        if not Path(path).is_file():
            raise UserError(f"{what.replace('_', ' ')} {path} not found; create it with `medsyngan pki init` or fix the path")


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
    """A Flower process started in its own session (Linux), its output in `log_path`."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    last: bool = False  # stopped after all others (the SuperLink)
    seen: set[Proc] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
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
        """SIGTERM the process group: Flower shuts down cleanly (a SuperNode ends its session at the SuperLink,
        the SuperLink stops its SuperExec and ServerApp)."""
        self.track()
        if self.alive():
            try:
                os.killpg(self.pid, signal.SIGTERM)
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


def start_process(name: str, cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    proc = ManagedProcess(name, popen, log_path)
    proc.track()
    return proc


def stop_all(processes: Iterable[ManagedProcess], grace: float = 10.0) -> list[int]:
    """SIGTERM everything, SIGKILL what is still running after `grace` seconds; returns the pids still running
    afterwards (should be none). SuperLinks go last, so that SuperNodes can still end their sessions there."""
    procs = list(processes)
    for wave in ([p for p in procs if not p.last], [p for p in procs if p.last]):
        for proc in wave:
            proc.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(proc.running() for proc in wave):
            time.sleep(0.2)
        for proc in wave:
            proc.kill_leftovers()
    return sorted({pid for proc in procs for pid in proc.leftovers()})


# --- SuperLink -----------------------------------------------------------------------------------------------


def superlink_command(ca_cert: Path, cert: Path, key: Path, host: str, port: int, database: Path | None = None) -> list[str]:
    """`database` None keeps registrations and runs in memory (lost when the SuperLink stops). Paths are made
    absolute: the SuperLink runs in its own home folder."""
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile", str(Path(ca_cert).resolve()),
        "--ssl-certfile", str(Path(cert).resolve()),
        "--ssl-keyfile", str(Path(key).resolve()),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ] + (["--database", str(Path(database).resolve())] if database is not None else [])


def start_superlink(
    run_dir: Path, ca_cert: Path, cert: Path, key: Path, *, host: str = "127.0.0.1", port: int = 9093,
    database: Path | None = None, timeout: float = 60.0,
) -> ManagedProcess:
    """Start a SuperLink with TLS and SuperNode authentication; returns once it accepts connections."""
    require_files(ca_certificate=ca_cert, superlink_certificate=cert, superlink_key=key)
    home = run_dir / "superlink"
    home.mkdir(parents=True, exist_ok=True)
    cmd = superlink_command(ca_cert, cert, key, host, port, database)
    proc = start_process("superlink", cmd, home / "superlink.log", flower_env(home), cwd=home)
    proc.last = True
    try:
        if proc.wait_for(_READY_SUPERLINK, timeout) is None:
            raise UserError(f"flower-superlink exited during start-up; see {proc.log_path}: {proc.log_tail(1)}")
    except BaseException:
        stop_all([proc])
        raise
    return proc


def probe_superlink(address: str, ca_cert: Path, timeout: float = 10.0) -> None:
    """Fail with one clear line unless a TLS handshake with `address` verifies against the federation's CA."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UserError(f"SuperLink address {address!r} is not host:port")
    require_files(ca_certificate=ca_cert)
    context = ssl.create_default_context(cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=3) as sock:
                with context.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as exc:
            raise UserError(f"SuperLink {address} presents a certificate that {ca_cert} does not verify ({exc.verify_message}); use the federation's ca.crt") from None
        except OSError as exc:
            if time.monotonic() > deadline:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise UserError(f"SuperLink {address} cannot be reached ({reason}); start it or check the address and firewall") from None
            time.sleep(0.5)


# --- the flwr CLI: connection and registration -----------------------------------------------------------------


def write_connection(flwr_home: Path, address: str, ca_cert: Path, name: str = CONNECTION) -> Path:
    """A Flower config file with one default SuperLink connection (TLS verified against the federation CA)."""
    import tomli_w

    from medsyngan.rundir import atomic_write_text

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    doc = {"superlink": {"default": name, name: {"address": address, "root-certificates": str(Path(ca_cert).resolve())}}}
    atomic_write_text(path, tomli_w.dumps(doc))
    return path


def register_hospitals(
    flwr_home: Path, public_keys: dict[str, Path], connection: str = CONNECTION, timeout: float = 60.0
) -> dict[str, int]:
    """`flwr supernode register PUBLIC_KEY CONNECTION --name NAME` for each hospital (concurrently: each CLI call
    pays Python start-up): afterwards the SuperLink accepts a SuperNode holding the matching private key.
    Returns the node id the SuperLink assigned to each name."""
    for key in public_keys.values():
        require_files(hospital_public_key=key)
    env = flower_env(flwr_home)
    calls = {
        name: subprocess.Popen(
            [executable("flwr"), "supernode", "register", str(key), connection, "--name", name, "--format", "json"],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )
        for name, key in public_keys.items()
    }
    node_ids: dict[str, int] = {}
    errors: list[str] = []
    for name, call in calls.items():
        try:
            out, err = call.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            call.kill()
            call.communicate()
            errors.append(f"{name}: no answer from the SuperLink after {timeout:.0f} s")
            continue
        try:
            payload = json.loads(out[out.index("{"):])
        except ValueError:
            payload = {}
        if call.returncode == 0 and payload.get("success"):
            node_ids[name] = int(payload["node-id"])
        else:
            lines = (str(payload.get("error-message") or "") or err.strip() or out.strip() or "no output").splitlines()
            errors.append(f"{name}: {lines[-1]}")
    if errors:
        raise UserError(f"registering hospital keys failed ({'; '.join(errors)})")
    return node_ids


# --- SuperNodes ------------------------------------------------------------------------------------------------


def node_config(
    hospital_id: int, data_path: Path | str, state_dir: Path | str | None = None,
    aggregator_public: Path | str | None = None,
) -> str:
    """The `--node-config` string the ClientApp reads: `hospital-id`, `data-path`, and optionally `state-dir` and
    `aggregator-public` (the aggregator's X25519 key pinned by `pki init`, for end-to-end update encryption).
    Paths are made absolute (the ClientApp runs in the SuperNode's home folder). Flower splits the string on
    spaces and reads each value as TOML, so paths go in TOML literal strings (single quotes, no escapes)."""
    text = f"hospital-id={int(hospital_id)}"
    for key, path in (("data-path", data_path), ("state-dir", state_dir), ("aggregator-public", aggregator_public)):
        if path is None:
            continue
        if "'" in str(path):
            raise UserError(f"{key} {str(path)!r} contains a single quote, which --node-config cannot carry; rename it")
        text += f" {key}='{Path(path).resolve()}'"
    return text


def supernode_command(
    superlink: str, ca_cert: Path, auth_key: Path, hospital_id: int, data_path: Path | str, runtime_port: int,
    state_dir: Path | str | None = None, aggregator_public: Path | str | None = None,
) -> list[str]:
    return [
        executable("flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(Path(ca_cert).resolve()),
        "--auth-supernode-private-key", str(Path(auth_key).resolve()),
        "--node-config", node_config(hospital_id, data_path, state_dir, aggregator_public),
        "--port", str(runtime_port),
    ]


def start_supernode(
    run_dir: Path, superlink: str, ca_cert: Path, auth_key: Path, hospital_id: int, data_path: Path | str,
    *, runtime_port: int = 9094, state_dir: Path | str | None = None, aggregator_public: Path | str | None = None,
    probe_timeout: float = 10.0,
) -> ManagedProcess:
    """Start one hospital's SuperNode once its SuperLink answers (does not wait for activation: see
    `wait_supernode`)."""
    require_files(ca_certificate=ca_cert, hospital_private_key=auth_key)
    probe_superlink(superlink, ca_cert, probe_timeout)
    home = run_dir / f"hospital-{hospital_id}"
    home.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(superlink, ca_cert, auth_key, hospital_id, data_path, runtime_port, state_dir, aggregator_public)
    return start_process(f"supernode-{hospital_id}", cmd, home / "supernode.log", flower_env(home), cwd=home)


def wait_supernode(proc: ManagedProcess, timeout: float = 60.0) -> int:
    """Wait until the SuperLink has activated this SuperNode; returns its node id. A SuperNode whose key was
    never registered is refused by the SuperLink and exits: that becomes a one-line error."""
    match = proc.wait_for(_READY_SUPERNODE, timeout)
    if match is None:
        if _SUPERNODE_REFUSED.search(proc.log_text()):
            raise UserError(f"{proc.name} was refused by the SuperLink: its public key is not registered (flwr supernode register); see {proc.log_path}")
        raise UserError(f"{proc.name} exited before connecting; see {proc.log_path}: {proc.log_tail(1)}")
    return int(match.group(1))


# --- runs ------------------------------------------------------------------------------------------------------


def run_config_arg(values: dict[str, object]) -> str:
    """`--run-config` text: Flower parses each value as TOML."""
    import tomli_w

    return " ".join(f"{key}={tomli_w.dumps({'v': value}).strip().removeprefix('v = ')}" for key, value in values.items())


def start_run(flwr_home: Path, app_dir: Path, log_path: Path, run_config: dict[str, object] | None = None, connection: str = CONNECTION) -> ManagedProcess:
    """`flwr run APP CONNECTION --stream`: submits the app to the SuperLink and streams the ServerApp's log
    until the run ends."""
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise UserError(f"{app_dir} has no pyproject.toml; give the Flower app's directory")
    cmd = [executable("flwr"), "run", str(Path(app_dir).resolve()), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", run_config_arg(run_config)]
    return start_process("flwr-run", cmd, log_path, flower_env(flwr_home), cwd=Path(app_dir))


def medsyngan_run_config(
    preset: str, overrides: list[str], run_dir: Path, resume: bool = False, aggregator_key: Path | None = None
) -> dict[str, object]:
    """The run config of MedSynGAN's own Flower app (`[tool.flwr.app.config]` in pyproject.toml) for a real
    deployment: the aggregator writes `run_dir` on the SuperLink's machine and, when the configuration encrypts
    updates, reads `aggregator_key` there; each hospital brings its data-path. The configuration is resolved here
    first, so that a bad preset or override is a one-line error before anything is submitted."""
    from medsyngan.config import load_config

    for item in overrides:
        if any(c in item for c in " '\""):
            raise UserError(f"override {item!r} must be section.key=value without spaces or quotes")
    cfg = load_config(preset, overrides)
    config: dict[str, object] = {"config": preset, "overrides": " ".join(overrides),
                                 "run-dir": str(Path(run_dir).resolve()), "resume": resume, "mode": "deployment"}
    if cfg.privacy.encrypt:
        if aggregator_key is None:
            raise UserError("privacy.encrypt is on: give the aggregator's key (aggregator_x25519.key from `medsyngan pki init`)")
        require_files(aggregator_key=aggregator_key)
        config["aggregator-key"] = str(Path(aggregator_key).resolve())
    return config
