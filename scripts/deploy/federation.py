#!/usr/bin/env python
"""Launch a MedSynGAN federation on Flower's Deployment Engine (see "Deploy across hospitals" in README.md).

Each step is one subcommand, run where it belongs:

    aggregator machine   federation.py superlink --pki PKI --state DIR [--host 0.0.0.0 --port 9093]
    aggregator machine   federation.py register  --pki PKI --superlink HOST:PORT
    hospital K           federation.py supernode --hospital-dir hospital-K --hospital-id K --superlink HOST:PORT \
                                                  --data-path PREPARED_DIR
    aggregator machine   federation.py run       --superlink HOST:PORT --ca PKI/ca.crt --run-dir runs/fed \
                                                  [--preset federated-dcgan64] [--set section.key=value ...]
    one machine          federation.py rehearse  --pki PKI --data DIR0 DIR1 DIR2 --work DIR [--set ...]

`superlink` and `supernode` print the Flower command they run and then become it (Ctrl-C stops it and the
processes it started); `rehearse` runs a whole federation on loopback and stops everything at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from medsyngan.errors import UserError
from medsyngan.federated import deploy, processes
from medsyngan.federated.pki import Pki

REPO = Path(__file__).resolve().parents[2]


def _exec(cmd: list[str], flwr_home: Path) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    os.execve(cmd[0], cmd, processes.flower_env(flwr_home))


def cmd_superlink(args: argparse.Namespace) -> None:
    pki = Pki(args.pki)
    deploy.require_files(ca_certificate=pki.ca_cert, superlink_certificate=pki.server_cert, superlink_key=pki.server_key)
    args.state.mkdir(parents=True, exist_ok=True)
    database = args.state / "state.db" if args.persist else None
    os.chdir(args.state)
    _exec(deploy.superlink_command(pki.ca_cert, pki.server_cert, pki.server_key, args.host, args.port, database), args.state)


def cmd_register(args: argparse.Namespace) -> None:
    pki = Pki(args.pki)
    deploy.probe_superlink(args.superlink, pki.ca_cert)
    deploy.write_connection(args.flwr_home, args.superlink, pki.ca_cert)
    hospitals = args.hospitals if args.hospitals is not None else pki.hospitals()
    ids = deploy.register_hospitals(args.flwr_home, {f"hospital-{k}": pki.hospital_pub(k) for k in hospitals})
    for name, node_id in ids.items():
        print(f"{name}: registered as SuperNode {node_id}")


def cmd_supernode(args: argparse.Namespace) -> None:
    ca, key = args.hospital_dir / "ca.crt", args.hospital_dir / "auth.key"
    deploy.require_files(ca_certificate=ca, hospital_private_key=key)
    if not args.data_path.is_dir():
        raise UserError(f"data path {args.data_path} is not a folder; give the hospital's prepared dataset (medsyngan data prepare)")
    deploy.probe_superlink(args.superlink, ca)
    args.flwr_home.mkdir(parents=True, exist_ok=True)
    pinned = args.hospital_dir / "aggregator_x25519.pub"
    cmd = deploy.supernode_command(args.superlink, ca, key, args.hospital_id, args.data_path.resolve(), args.port,
                                   args.state_dir.resolve() if args.state_dir else None,
                                   pinned.resolve() if pinned.is_file() else None,
                                   args.policy.resolve() if args.policy else None)
    _exec(cmd, args.flwr_home)


def cmd_run(args: argparse.Namespace) -> None:
    deploy.probe_superlink(args.superlink, args.ca)
    deploy.write_connection(args.flwr_home, args.superlink, args.ca)
    config = deploy.medsyngan_run_config(args.preset, args.set or [], args.run_dir, args.resume, args.aggregator_key)
    cmd = [processes.executable("flwr"), "run", str(args.app.resolve()), deploy.CONNECTION, "--stream",
           "--run-config", deploy.run_config_arg(config)]
    _exec(cmd, args.flwr_home)


def cmd_rehearse(args: argparse.Namespace) -> None:
    """The whole federation on this machine, each piece a separate process, as the test runs it."""
    pki = Pki(args.pki)
    work = args.work.resolve()
    procs: list[processes.ManagedProcess] = []
    try:
        port = processes.free_port()
        address = f"127.0.0.1:{port}"
        procs.append(deploy.start_superlink(work, pki.ca_cert, pki.server_cert, pki.server_key, port=port))
        print(f"SuperLink on {address} (log {procs[0].log_path})", flush=True)
        cli_home = work / "cli"
        deploy.write_connection(cli_home, address, pki.ca_cert)
        ids = deploy.register_hospitals(cli_home, {f"hospital-{k}": pki.hospital_pub(k) for k in range(len(args.data))})
        print("registered: " + ", ".join(f"{n} = {i}" for n, i in ids.items()), flush=True)
        nodes = [
            deploy.start_supernode(work, address, pki.ca_cert, pki.hospital_key(k), k, Path(d).resolve(),
                                   runtime_port=processes.free_port(), state_dir=work / "hospital-state",
                                   aggregator_public=pki.hospital_dir(k) / "aggregator_x25519.pub")
            for k, d in enumerate(args.data)
        ]
        procs += nodes
        config = deploy.medsyngan_run_config(args.preset, args.set or [], work / "run", aggregator_key=pki.aggregator_key)
        run = deploy.start_run(cli_home, args.app, work / "flwr-run.log", config)
        procs.append(run)
        for node in nodes:
            print(f"{node.name}: SuperNode {deploy.wait_supernode(node)} (log {node.log_path})", flush=True)
        print(f"run started; streaming {run.log_path}", flush=True)
        shown = 0
        while run.alive():
            text = run.log_text()
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
            time.sleep(0.5)
        sys.stdout.write(run.log_text()[shown:])
        print(f"flwr run exited with {run.popen.returncode}; outputs in {work / 'run'}")
    finally:
        left = processes.stop_all(procs)
        if left:
            print(f"warning: processes still running: {left}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))

    p = sub.add_parser("superlink", help="start the SuperLink (TLS, SuperNode authentication)")
    p.add_argument("--pki", type=Path, required=True, help="folder from `medsyngan pki init`")
    p.add_argument("--state", type=Path, required=True, help="SuperLink home: installed apps, optional state.db")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    p.add_argument("--port", type=int, default=9093, help="the one HTTPS port for Fleet, Control and Runtime APIs")
    p.add_argument("--persist", action="store_true", help="keep registrations and runs in STATE/state.db across restarts")
    p.set_defaults(fn=cmd_superlink)

    p = sub.add_parser("register", help="register hospitals' public keys with the SuperLink")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--superlink", required=True, help="HOST:PORT as in the SuperLink certificate")
    p.add_argument("--hospitals", type=int, nargs="*", help="hospital ids (default: all in the PKI manifest)")
    p.add_argument("--flwr-home", type=Path, default=home, help="where the flwr CLI keeps config.toml")
    p.set_defaults(fn=cmd_register)

    p = sub.add_parser("supernode", help="start one hospital's SuperNode")
    p.add_argument("--hospital-dir", type=Path, required=True, help="the hospital-K folder shipped from the PKI")
    p.add_argument("--hospital-id", type=int, required=True)
    p.add_argument("--superlink", required=True)
    p.add_argument("--data-path", type=Path, required=True, help="the hospital's prepared dataset")
    p.add_argument("--state-dir", type=Path, help="where the hospital keeps its training state across rounds")
    p.add_argument("--port", type=int, default=9094, help="local Runtime API port of this SuperNode")
    p.add_argument("--policy", type=Path, help="the hospital's privacy policy file (default: the product defaults)")
    p.add_argument("--flwr-home", type=Path, default=home)
    p.set_defaults(fn=cmd_supernode)

    for name, fn in (("run", cmd_run), ("rehearse", cmd_rehearse)):
        p = sub.add_parser(name, help="submit the run with flwr run" if name == "run" else "whole federation on loopback")
        p.add_argument("--app", type=Path, default=REPO, help="the Flower app (default: this repository)")
        p.add_argument("--preset", default="federated-dcgan64")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="configuration override (repeatable)")
        if name == "run":
            p.add_argument("--superlink", required=True)
            p.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
            p.add_argument("--run-dir", type=Path, required=True, help="run directory on the aggregator's machine")
            p.add_argument("--resume", action="store_true")
            p.add_argument("--aggregator-key", type=Path, help="PKI/aggregator_x25519.key (needed with privacy.encrypt)")
            p.add_argument("--flwr-home", type=Path, default=home)
        else:
            p.add_argument("--pki", type=Path, required=True)
            p.add_argument("--data", type=Path, nargs="+", required=True, help="one prepared dataset per hospital")
            p.add_argument("--work", type=Path, required=True, help="folder for logs, state and the run")
        p.set_defaults(fn=fn)

    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
