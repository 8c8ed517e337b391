#!/usr/bin/env python
"""Launch a MedSynGAN federation on Flower's Deployment Engine (docs/deployment.md).

Each step is one subcommand, run where it belongs:

    aggregator machine   federation.py superlink     --pki PKI --state DIR [--host 127.0.0.1 --port 9092]
    aggregator machine   federation.py proxy-config  --pki PKI --operator OPERATOR_IP > superlink-nginx.conf
    aggregator machine   federation.py register      --pki PKI --superlink HOST:PORT
    hospital K           medsyngan hospital start    --hospital-dir DIR --superlink HOST:PORT --data-path DIR --home DIR
    aggregator machine   federation.py run           --pki PKI --superlink HOST:PORT --run-dir runs/fed [--set ...]
    one machine          federation.py rehearse      --pki PKI --hospitals DIR... --data DIR... --work DIR [--set ...]

`superlink` and `run` print the Flower command they run and then become it (Ctrl-C stops it and the processes it
started); `run` first signs the app and its run config with the federation's key, which every hospital checks;
`rehearse` runs a whole federation on loopback and stops everything at the end.
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
from medsyngan.federated.pki import Pki, read_manifest
from medsyngan.federated.superlink_routes import nginx_config
from medsyngan.sealed import ensure_key_file

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


def cmd_proxy_config(args: argparse.Namespace) -> None:
    pki = Pki(args.pki)
    deploy.require_files(ca_certificate=pki.ca_cert, superlink_certificate=pki.server_cert, superlink_key=pki.server_key)
    server_name = args.server_name or read_manifest(pki.manifest)["host"]
    print(nginx_config(args.listen, args.upstream_port, server_name, str(pki.server_cert.resolve()),
                       str(pki.server_key.resolve()), str(pki.ca_cert.resolve()), args.operator), end="")


def cmd_register(args: argparse.Namespace) -> None:
    pki = Pki(args.pki)
    deploy.probe_superlink(args.superlink, pki.ca_cert)
    deploy.write_connection(args.flwr_home, args.superlink, pki.ca_cert)
    hospitals = args.hospitals if args.hospitals is not None else pki.hospitals()
    ids = deploy.register_hospitals(args.flwr_home, {f"hospital-{k}": pki.hospital_pub(k) for k in hospitals})
    for name, node_id in ids.items():
        print(f"{name}: registered as SuperNode {node_id}")


def _signed_config(args: argparse.Namespace, pki: Pki, run_dir: Path) -> dict[str, object]:
    config = deploy.medsyngan_run_config(args.preset, args.set or [], run_dir, pki.manifest, args.resume,
                                         pki.aggregator_key)
    return deploy.signed_run_config(config, args.signing_key or pki.federation_key, args.app)


def cmd_run(args: argparse.Namespace) -> None:
    pki = Pki(args.pki)
    deploy.probe_superlink(args.superlink, pki.ca_cert)
    deploy.write_connection(args.flwr_home, args.superlink, pki.ca_cert)
    config = _signed_config(args, pki, args.run_dir)
    cmd = [processes.executable("flwr"), "run", str(args.app.resolve()), deploy.CONNECTION, "--stream",
           "--run-config", deploy.run_config_arg(config)]
    _exec(cmd, args.flwr_home)


def cmd_rehearse(args: argparse.Namespace) -> None:
    """The whole federation on this machine, each piece a separate process, as the test runs it."""
    if len(args.hospitals) != len(args.data):
        raise UserError(f"{len(args.hospitals)} hospital folders but {len(args.data)} datasets; give one of each per hospital")
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
        ids = deploy.register_hospitals(cli_home, {f"hospital-{k}": pki.hospital_pub(k) for k in pki.hospitals()})
        print("registered: " + ", ".join(f"{n} = {i}" for n, i in ids.items()), flush=True)
        # Each rehearsed hospital seals its state (and its DP seeds) with a key of its own.
        keys = [work / "keys" / f"hospital-{k}-state.key" for k in range(len(args.hospitals))]
        for key in keys:
            ensure_key_file(key, "a rehearsed hospital's state")
        nodes = [deploy.start_hospital(work, f"hospital-{k}", folder, address, data, runtime_port=processes.free_port(),
                                       state_dir=work / "hospital-state", state_key=keys[k])
                 for k, (folder, data) in enumerate(zip(args.hospitals, args.data))]
        procs += nodes
        run = deploy.start_run(cli_home, args.app, work / "flwr-run.log", _signed_config(args, pki, work / "run"))
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
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback: publish it through the proxy of proxy-config)")
    p.add_argument("--port", type=int, default=9092, help="the one HTTPS port of the Fleet, Control and Runtime APIs")
    p.add_argument("--persist", action="store_true", help="keep registrations and runs in STATE/state.db across restarts")
    p.set_defaults(fn=cmd_superlink)

    p = sub.add_parser("proxy-config", help="print an nginx server block that publishes only the Fleet and Control APIs")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--listen", default="0.0.0.0:9093", help="the public address:port hospitals dial")
    p.add_argument("--upstream-port", type=int, default=9092, help="the SuperLink's port on 127.0.0.1")
    p.add_argument("--server-name", help="the SuperLink's host name (default: the one in the PKI)")
    p.add_argument("--operator", action="append", required=True, metavar="ADDRESS",
                   help="IP address or CIDR range allowed to use the Control API (repeatable)")
    p.set_defaults(fn=cmd_proxy_config)

    p = sub.add_parser("register", help="register hospitals' public keys with the SuperLink")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--superlink", required=True, help="HOST:PORT as in the SuperLink certificate")
    p.add_argument("--hospitals", type=int, nargs="*", help="hospital ids (default: all in the PKI manifest)")
    p.add_argument("--flwr-home", type=Path, default=home, help="where the flwr CLI keeps config.toml")
    p.set_defaults(fn=cmd_register)

    for name, fn in (("run", cmd_run), ("rehearse", cmd_rehearse)):
        p = sub.add_parser(name, help="sign the app and run config, submit the run" if name == "run"
                           else "whole federation on loopback")
        p.add_argument("--pki", type=Path, required=True, help="folder from `medsyngan pki init`")
        p.add_argument("--app", type=Path, default=REPO, help="the Flower app (default: this repository)")
        p.add_argument("--preset", default="federated-dcgan64")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="configuration override (repeatable)")
        p.add_argument("--signing-key", type=Path, help="the federation's app-signing key (default: PKI/federation_app.key)")
        p.add_argument("--resume", action="store_true")
        if name == "run":
            p.add_argument("--superlink", required=True)
            p.add_argument("--run-dir", type=Path, required=True, help="run directory on the aggregator's machine")
            p.add_argument("--flwr-home", type=Path, default=home)
        else:
            p.add_argument("--hospitals", type=Path, nargs="+", required=True,
                           help="each hospital's folder (pki hospital-init, with the trust/ files), in the order of --data")
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
