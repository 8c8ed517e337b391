"""The SuperLink's one port: which URL paths belong to which Flower 1.42 API, who must reach each, and a reverse
proxy configuration that enforces it.

Flower 1.42's SuperLink is one FastAPI application (`flwr.superlink.main.create_app`) that uvicorn serves on
`--host:--port`, HTTPS when given a certificate. All three APIs share that port:

- Fleet API, ``/v1/fleet/…``: SuperNodes register, pull instructions and the app bundle, push replies. Each request
  is signed with the SuperNode's key (`--enable-supernode-auth`). Reachable by the hospitals.
- Control API, ``/v1/control/…``: the `flwr` CLI starts and stops runs (submitting any app bundle), registers and
  removes SuperNode keys, streams run logs. Unauthenticated in the open-source SuperLink: reachable by the
  operator only.
- Runtime API, ``/v1/runtime/…``: the SuperLink's own SuperExec takes the ServerApp's task here and the ServerApp
  sends and receives messages through it. Reachable from the SuperLink's machine only.
- ``/health`` (liveness) and FastAPI's ``/docs``, ``/docs/oauth2-redirect``, ``/openapi.json``: nobody outside.

Because one `--host` binds all of them, the SuperLink itself cannot keep the Runtime API on loopback while
publishing the Fleet API. So the SuperLink listens on 127.0.0.1 only, and a reverse proxy on the public address
(:func:`nginx_config`) forwards Fleet paths from anyone, Control paths from the operator's addresses, and nothing
else. tests/test_deployment.py checks :data:`API_ROUTES` against the routes of the installed Flower, so an
upgrade that adds or moves a route fails there before it reaches a proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HOSPITALS = "hospitals"
OPERATOR = "operator"
LOOPBACK = "loopback"


@dataclass(frozen=True)
class Api:
    name: str
    paths: tuple[str, ...]  # a path ending in "/" is a prefix; any other is matched exactly
    callers: str  # who calls it, in words
    reach: str  # HOSPITALS (anyone; Flower authenticates each node), OPERATOR, or LOOPBACK (nobody outside)

    def matches(self, path: str) -> bool:
        return any(path.startswith(p) if p.endswith("/") else path == p for p in self.paths)


API_ROUTES: tuple[Api, ...] = (
    Api("Fleet", ("/v1/fleet/",), "hospitals' SuperNodes", HOSPITALS),
    Api("Control", ("/v1/control/",), "the operator's `flwr` CLI", OPERATOR),
    Api("Runtime", ("/v1/runtime/",), "the SuperLink's own SuperExec and ServerApp", LOOPBACK),
    Api("health", ("/health",), "monitoring on the SuperLink's machine", LOOPBACK),
    Api("API documentation", ("/docs", "/docs/oauth2-redirect", "/openapi.json"), "nobody", LOOPBACK),
)


def api_of(path: str) -> Api | None:
    """The API a request path belongs to; None for a path no API serves."""
    return next((api for api in API_ROUTES if api.matches(path)), None)


def installed_routes() -> list[str]:
    """Every route path of the installed Flower's SuperLink application."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app

    return sorted({context.path for context in iter_route_contexts(create_app().routes)})


def nginx_config(listen: str, upstream_port: int, server_name: str, certificate: str, key: str, ca_certificate: str,
                 operator_addresses: Sequence[str]) -> str:
    """An nginx `server` block for the public side of a SuperLink that listens on 127.0.0.1:``upstream_port``:
    TLS with the SuperLink's own certificate, Fleet paths for everyone, Control paths for
    ``operator_addresses`` (IP addresses or CIDR ranges), 404 for every other path."""
    if not operator_addresses:
        raise ValueError("give at least one operator address: the Control API starts runs and registers nodes")
    upstream = (f"        proxy_pass https://127.0.0.1:{upstream_port};\n"
                f"        proxy_ssl_trusted_certificate {ca_certificate};\n"
                "        proxy_ssl_verify on;\n"
                "        proxy_ssl_name localhost;         # in the SuperLink certificate's SAN\n")
    lines = [
        "# The public side of a MedSynGAN SuperLink (medsyngan.federated.superlink_routes): the SuperLink itself",
        f"# listens on 127.0.0.1:{upstream_port} only, so its Runtime API never leaves that machine.",
        "server {",
        f"    listen {listen} ssl;",
        f"    server_name {server_name};",
        f"    ssl_certificate {certificate};",
        f"    ssl_certificate_key {key};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        "    client_max_body_size 256m;      # model updates and app bundles",
        "    proxy_http_version 1.1;",
        "    proxy_buffering off;              # `flwr log` and `flwr run --stream` stream the run's log",
        "    proxy_read_timeout 3600s;",
    ]
    for api in API_ROUTES:
        if api.reach == LOOPBACK:
            continue
        for path in api.paths:
            location = f"^~ {path}" if path.endswith("/") else f"= {path}"
            lines.append(f"    location {location} {{  # {api.name} API: {api.callers}")
            if api.reach == OPERATOR:
                lines += [f"        allow {address};" for address in operator_addresses] + ["        deny all;"]
            lines.append(upstream.rstrip("\n"))
            lines.append("    }")
    lines += ["    location / {  # Runtime API, health, API documentation and anything else: not from outside",
              "        return 404;", "    }", "}"]
    return "\n".join(lines) + "\n"
