"""A hospital's node that runs only app bundles signed with the federation's key: `medsyngan hospital start`.

Flower 1.42 runs a ClientApp in three steps: the SuperNode (`flower-supernode`) pulls messages from the SuperLink;
a SuperExec acquires each ClientApp task from the SuperNode's local Runtime API and starts `flwr-clientapp`; that
process pulls the task's bundle (FAB), installs it and imports the ClientApp the bundle names. In its default
`--isolation subprocess` the SuperNode starts Flower's SuperExec itself, which runs any bundle. A hospital started
here runs the SuperNode with `--isolation process` and is its SuperExec:

- Flower's SuperExec loop (`run_superexec`), with :class:`VerifyingExecutor` as its executor: it asks the SuperNode
  for ClientApp tasks only (agent, connector and model tasks would run a bundle's code too) and starts each with
  :func:`run_verified_clientapp` instead of `flwr-clientapp`.
- :func:`run_verified_clientapp` is Flower's own `run_clientapp` with one step added between pulling the task's
  input and installing the bundle: the bundle and its run config must carry a valid federation signature
  (:mod:`~medsyngan.federated.app_signing`), else the task ends with an error reply, and nothing of the bundle is
  installed or imported.
- The SuperNode's Runtime API hands tasks only to a caller that proves a secret (`--superexec-auth-secret-file`),
  made afresh at every start and readable by this user only, so no other local process can take a task and run
  its bundle unverified.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from medsyngan.errors import UserError
from medsyngan.federated.app_signing import AppTrust, BundleRefused, load_federation_public
from medsyngan.federated.hospital_keys import HospitalDir

RUNNER_MODULE = "medsyngan.federated.hospital_node"  # run with -m for each ClientApp task
SECRET_FILE = "superexec.secret"
LEDGER_FILE = "app-signatures.json"


class VerifyingExecutor:
    """Flower's SuperExec executor interface (`flwr.supercore.superexec.executor.Executor`): ClientApp tasks only,
    each run by :func:`run_verified_clientapp` in a child process that gets its task token on stdin."""

    def __init__(self, trust: AppTrust, companion: subprocess.Popen | None = None):
        from flwr.supercore.constant import TaskType

        self.trust = trust
        self.companion = companion  # the SuperNode this executor serves: stopped with it
        self.task_types = frozenset({TaskType.CLIENT_APP})
        self.children: list[subprocess.Popen] = []

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return set(supported_task_types) & self.task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type not in self.task_types:
            return LaunchResult.failed(f"this hospital runs ClientApp tasks only, not {spec.task_type}")
        cmd = [sys.executable, "-m", RUNNER_MODULE, "--runtime-api-address", spec.runtime_api_address, "--token-stdin",
               "--federation-public", str(self.trust.federation_public), "--signature-ledger", str(self.trust.ledger),
               "--parent-pid", str(os.getpid())]
        if spec.insecure:
            cmd.append("--insecure")
        elif spec.root_certificates_path is not None:
            cmd += ["--root-certificates", spec.root_certificates_path]
        child = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        self.children.append(child)
        try:
            child.stdin.write(f"{spec.token}\n".encode())
            child.stdin.close()
        except OSError as exc:
            return LaunchResult.failed(f"the ClientApp process did not take its task token ({exc})")
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self.children = [child for child in self.children if child.poll() is None]

    def close(self) -> None:
        procs = self.children + ([self.companion] if self.companion is not None else [])
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_verified_clientapp(runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None,
                           parent_pid: int | None, trust: AppTrust) -> None:
    """Flower's `run_clientapp`, refusing a task whose bundle and run config the federation did not sign. The
    check wraps `pull_task_input`, which Flower calls before `install_from_fab` and the ClientApp's import
    (tests/test_app_signing.py pins that order in the installed Flower)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supernode.runtime import run_clientapp as flower

    pull_task_input = flower.pull_task_input

    def pull_verified(client):
        message, context, run, fab = pull_task_input(client)
        try:
            trust.check(fab.content, context.run_config, run.run_id)
        except (BundleRefused, UserError) as exc:
            reason = f"app bundle refused: {exc}"
            try:
                flower.push_message(client, Message(Error(ErrorCode.INVALID_FAB, reason), reply_to=message), context)
            finally:
                flwr_exit(ExitCode.TASK_PROC_EXCEPTION, f"run {run.run_id}: {reason}")
        return message, context, run, fab

    with mock.patch.object(flower, "pull_task_input", pull_verified):
        flower.run_clientapp(runtime_api_address=runtime_api_address, token=token, insecure=insecure,
                             certificates=certificates, parent_pid=parent_pid, runtime_dependency_install=False)


def _runner_main(argv: Sequence[str] | None = None) -> None:
    """The ClientApp process :class:`VerifyingExecutor` starts (`python -m medsyngan.federated.hospital_node`)."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    parser = argparse.ArgumentParser(description="A ClientApp task, run only if its bundle is signed")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--federation-public", type=Path, required=True)
    parser.add_argument("--signature-ledger", type=Path, required=True)
    add_args_flwr_app_common(parser, include_token_stdin=True, include_runtime_dependency_install=False)
    args = parser.parse_args(argv)
    run_verified_clientapp(args.runtime_api_address, try_obtain_flwr_app_token(args), args.insecure,
                           validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
                           args.parent_pid, AppTrust(args.federation_public, args.signature_ledger))


# --- the hospital's node: SuperNode and verifying SuperExec ----------------------------------------------------


@dataclass(frozen=True)
class HospitalNode:
    """Everything `medsyngan hospital start` needs: the hospital's folder (its key, its id and the files it pins),
    where the SuperLink is, its data, and its own folders."""

    hospital: HospitalDir
    superlink: str
    data_path: Path
    home: Path  # Flower's home for this node: installed bundles, the SuperExec secret, the signature ledger
    runtime_port: int = 9094
    state_dir: Path | None = None
    state_key: Path | None = None
    policy: Path | None = None  # the hospital's privacy policy file; None: the product defaults

    def check(self) -> None:
        """Refuse, in one line, a node that would run without what it must pin, before anything starts."""
        from medsyngan.federated.deploy import require_files
        from medsyngan.privacy.crypto import load_public_key

        h = self.hospital
        require_files("create the hospital's keys with `medsyngan pki hospital-init` or fix --hospital-dir",
                      hospital_private_key=h.auth_key)
        h.hospital_id()
        require_files("copy ca.crt from the operator's trust/ folder into the hospital folder", ca_certificate=h.ca_cert)
        if not h.aggregator_pub.is_file():
            raise UserError(f"aggregator key pin {h.aggregator_pub} not found: a deployed hospital sends updates "
                            "only to the aggregator whose key it pins; copy aggregator_x25519.pub from the operator's "
                            "trust/ folder into the hospital folder")
        load_public_key(h.aggregator_pub)
        load_federation_public(h.federation_pub)
        if not Path(self.data_path).is_dir():
            raise UserError(f"data path {self.data_path} is not a folder; give the hospital's prepared dataset "
                            "(medsyngan data prepare)")
        if self.state_key is not None:
            require_files("create it with `medsyngan privacy keygen` or fix --state-key", state_key=self.state_key)
        if self.policy is not None:
            from medsyngan.federated.policy import load_policy

            load_policy(str(self.policy))  # a bad policy file is refused here, not at the first round

    @property
    def trust(self) -> AppTrust:
        return AppTrust(self.hospital.federation_pub.resolve(), (self.home / LEDGER_FILE).resolve())

    def supernode_command(self, secret_file: Path) -> list[str]:
        from medsyngan.federated.deploy import node_config
        from medsyngan.federated.processes import executable

        h = self.hospital
        config = node_config(h.hospital_id(), self.data_path, state_dir=self.state_dir, state_key=self.state_key,
                             aggregator_public=h.aggregator_pub, policy=self.policy)
        return [
            executable("flower-supernode"),
            "--superlink", self.superlink,
            "--root-certificates", str(h.ca_cert.resolve()),
            "--auth-supernode-private-key", str(h.auth_key.resolve()),
            "--node-config", config,
            "--isolation", "process",
            "--superexec-auth-secret-file", str(secret_file.resolve()),
            "--host", "127.0.0.1",
            "--port", str(self.runtime_port),
        ]

    def run(self) -> int:
        """Start the SuperNode and serve it as its verifying SuperExec until either stops; returns the exit status
        (the SuperNode's, when it is the one that stopped)."""
        from flwr.supercore.superexec import run_superexec as superexec

        from medsyngan.federated.deploy import probe_superlink
        from medsyngan.federated.pki import write_private
        from medsyngan.federated.processes import flower_env

        self.check()
        probe_superlink(self.superlink, self.hospital.ca_cert)
        self.home.mkdir(parents=True, exist_ok=True)
        os.environ.update(flower_env(self.home.resolve()))  # the ClientApp processes install bundles there
        secret = secrets.token_bytes(32)
        secret_file = self.home / SECRET_FILE
        secret_file.unlink(missing_ok=True)
        write_private(secret_file, secret)
        command = self.supernode_command(secret_file)
        print("+ " + shlex.join(command), flush=True)
        supernode = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     preexec_fn=_terminate_with_parent)
        executor = VerifyingExecutor(self.trust, companion=supernode)
        threading.Thread(target=_exit_with, args=(supernode, executor), daemon=True).start()
        with mock.patch.object(superexec, "get_executor", lambda *args, **kwargs: executor):
            superexec.run_superexec(runtime_api_address=f"127.0.0.1:{self.runtime_port}", insecure=True,
                                    superexec_auth_secret=secret, runtime_dependency_install=False)
        return supernode.wait()


def _terminate_with_parent() -> None:
    """In the SuperNode's process before exec: SIGTERM when the hospital's node process dies (Linux), so that a
    SuperNode never keeps pulling work that no verifying SuperExec will run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_with(supernode: subprocess.Popen, executor: VerifyingExecutor) -> None:
    """When the SuperNode exits (refused by the SuperLink, stopped), this process follows with its status."""
    status = supernode.wait()
    executor.close()
    os._exit(status if status > 0 else 0)


if __name__ == "__main__":
    _runner_main()
