"""Launching a real Flower 1.42 federation: SuperLink, hospital registration, hospitals' nodes and `flwr run`.

Used by `scripts/deploy/*` and by the loopback integration test, so that what the guide documents is what the
test runs. Flower 1.42 serves the Fleet, Control and Runtime APIs of the SuperLink over one HTTPS port
(`--host/--port`; which path is which: :mod:`~medsyngan.federated.superlink_routes`); SuperNode authentication is
`--enable-supernode-auth` plus `flwr supernode register` of each hospital's public key over the Control API; the
`flwr` CLI finds the SuperLink through a named connection in `$FLWR_HOME/config.toml` (never through
`[tool.flwr.federations]`, which `flwr run` would migrate by rewriting the app's pyproject.toml). A hospital's node
is `medsyngan hospital start` (:mod:`~medsyngan.federated.hospital_node`): a SuperNode that runs only bundles
signed with the federation's key, and a run is submitted with its signature (:mod:`~medsyngan.federated.app_signing`).

Every process is started in its own session and stopped with everything it spawned
(:mod:`~medsyngan.federated.processes`): the SuperLink starts a SuperExec in a *separate* session (which then
starts `flwr-serverapp`), and each hospital's node starts a SuperNode and one ClientApp process per task, so
killing one process group is not enough.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from medsyngan.errors import UserError
from medsyngan.federated.processes import ManagedProcess, executable, flower_env, start_process, stop_all

CONNECTION = "medsyngan"

SUPERLINK_READY = re.compile(r"Uvicorn running on https?://")
_READY_SUPERNODE = re.compile(r"SuperNode ID: (\d+)")
_SUPERNODE_REFUSED = re.compile(r"Failed to activate SuperNode|Exit Code: 305")


def require_files(hint: str = "create it with `medsyngan pki init` or fix the path", **paths: Path) -> None:
    """One-line error for the first missing file, before anything starts; ``hint`` says where it comes from."""
    for what, path in paths.items():
        if not Path(path).is_file():
            raise UserError(f"{what.replace('_', ' ')} {path} not found; {hint}")


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
        if proc.wait_for(SUPERLINK_READY, timeout) is None:
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


def write_connection(flwr_home: Path, address: str, ca_cert: Path | None, name: str = CONNECTION) -> Path:
    """A Flower config file with one default SuperLink connection: TLS verified against the federation CA, or
    plain HTTP for a SuperLink that only listens on loopback (``ca_cert`` None)."""
    import tomli_w

    from medsyngan.rundir import atomic_write_text

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    security = {"root-certificates": str(Path(ca_cert).resolve())} if ca_cert is not None else {"insecure": True}
    doc = {"superlink": {"default": name, name: {"address": address, **security}}}
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


# --- hospitals' nodes -------------------------------------------------------------------------------------------


def node_config(hospital_id: int, data_path: Path | str, **paths: Path | str | None) -> str:
    """The `--node-config` string the ClientApp reads: `hospital-id`, `data-path`, and the optional files and
    folders in ``paths`` (``state_dir`` → `state-dir`, ``state_key``, ``aggregator_public``: the aggregator's
    X25519 key the hospital pins, ``policy``: its privacy policy file). Paths are made absolute (the ClientApp runs in another folder). Flower splits
    the string on spaces and reads each value as TOML, so paths go in TOML literal strings (single quotes)."""
    text = f"hospital-id={int(hospital_id)}"
    for key, path in (("data_path", data_path), *paths.items()):
        if path is None:
            continue
        name = key.replace("_", "-")
        if "'" in str(path):
            raise UserError(f"{name} {str(path)!r} contains a single quote, which --node-config cannot carry; rename it")
        text += f" {name}='{Path(path).resolve()}'"
    return text


def hospital_command(hospital_dir: Path, superlink: str, data_path: Path | str, home: Path, runtime_port: int,
                     state_dir: Path | str | None = None, state_key: Path | str | None = None,
                     policy: Path | str | None = None) -> list[str]:
    """`medsyngan hospital start …`: the hospital's SuperNode with its verifying SuperExec."""
    cmd = [sys.executable, "-m", "medsyngan.cli", "hospital", "start", "--hospital-dir", str(Path(hospital_dir).resolve()),
           "--superlink", superlink, "--data-path", str(Path(data_path).resolve()), "--home", str(Path(home).resolve()),
           "--port", str(runtime_port)]
    for option, path in (("--state-dir", state_dir), ("--state-key", state_key), ("--policy", policy)):
        if path is not None:
            cmd += [option, str(Path(path).resolve())]
    return cmd


def start_hospital(
    run_dir: Path, name: str, hospital_dir: Path, superlink: str, data_path: Path | str, *,
    runtime_port: int = 9094, state_dir: Path | str | None = None, state_key: Path | str | None = None,
    policy: Path | str | None = None, probe_timeout: float = 10.0,
) -> ManagedProcess:
    """Start one hospital's node (`medsyngan hospital start`) in ``run_dir/name`` once its SuperLink answers;
    does not wait for activation (see `wait_supernode`)."""
    from medsyngan.federated.hospital_keys import HospitalDir

    probe_superlink(superlink, HospitalDir(Path(hospital_dir)).ca_cert, probe_timeout)
    home = run_dir / name
    home.mkdir(parents=True, exist_ok=True)
    cmd = hospital_command(hospital_dir, superlink, data_path, home / "flwr", runtime_port, state_dir, state_key,
                           policy)
    return start_process(name, cmd, home / "supernode.log", flower_env(home / "flwr"), cwd=home)


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
    preset: str, overrides: list[str], run_dir: Path, manifest: Path, resume: bool = False,
    aggregator_key: Path | None = None,
) -> dict[str, object]:
    """The run config of MedSynGAN's own Flower app (`[tool.flwr.app.config]` in pyproject.toml) for a real
    deployment: the aggregator writes `run_dir` on the SuperLink's machine, maps each SuperNode to its hospital
    through the PKI's `manifest`, and, when the configuration encrypts updates, reads `aggregator_key` there; each
    hospital brings its data-path. The configuration is resolved here first, so that a bad preset or override is
    a one-line error before anything is submitted. Sign it with `signed_run_config` before `flwr run`."""
    from medsyngan.config import load_config
    from medsyngan.federated.hospital_keys import HospitalKeys

    for item in overrides:
        if any(c in item for c in " '\""):
            raise UserError(f"override {item!r} must be section.key=value without spaces or quotes")
    cfg = load_config(preset, overrides)
    HospitalKeys.from_manifest(manifest)
    config: dict[str, object] = {"config": preset, "overrides": " ".join(overrides),
                                 "run-dir": str(Path(run_dir).resolve()), "resume": resume, "mode": "deployment",
                                 "manifest": str(Path(manifest).resolve())}
    if cfg.privacy.encrypt:
        if aggregator_key is None:
            raise UserError("privacy.encrypt is on: give the aggregator's key (aggregator_x25519.key from `medsyngan pki init`)")
        require_files(aggregator_key=aggregator_key)
        config["aggregator-key"] = str(Path(aggregator_key).resolve())
    return config


def signed_run_config(config: dict[str, Any], signing_key: Path, app_dir: Path) -> dict[str, Any]:
    """``config`` with the federation's `app-signature` over the app in ``app_dir`` and ``config`` itself: sign
    right before `flwr run`, from the same folder, since any change to the app's files changes its bundle."""
    from medsyngan.federated.app_signing import SIGNATURE_KEY, sign_app

    return {**config, SIGNATURE_KEY: sign_app(signing_key, app_dir, config)}
