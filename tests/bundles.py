"""A hostile Flower app for the tests of signed bundles: whatever code of it runs at a hospital leaves a marker.

Its ClientApp module writes ``marker`` the moment it is imported (before any message is handled), so the marker's
absence proves that nothing of the bundle was imported at the hospital. Its ServerApp sends one query to every
node and writes each node's answer (``"ran"`` or the error reason) to ``report``, so a test can tell a refusal
from a message that never arrived.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

PYPROJECT = """\
[project]
name = "probeapp"
version = "1.0.0"
description = "writes a marker wherever its code runs"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "intruder"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
app-signature = ""
"""


def write_probe_app(folder: Path, marker: Path, report: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "probe_client.py").write_text(textwrap.dedent(f"""\
        from pathlib import Path

        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.clientapp import ClientApp

        Path({str(marker)!r}).write_text("code from the bundle ran at the hospital")
        app = ClientApp()


        @app.query()
        def query(message, context):
            return Message(RecordDict({{"answer": ConfigRecord({{"ran": 1}})}}), reply_to=message)
        """))
    (folder / "probe_server.py").write_text(textwrap.dedent(f"""\
        import json
        import time
        from pathlib import Path

        from flwr.app import ConfigRecord, Message, RecordDict
        from flwr.serverapp import ServerApp

        app = ServerApp()


        @app.main()
        def main(grid, context):
            deadline = time.monotonic() + 60
            nodes = []
            while not nodes and time.monotonic() < deadline:
                nodes = sorted(grid.get_node_ids())
                time.sleep(0.5)
            messages = [Message(RecordDict({{"ask": ConfigRecord({{"x": 1}})}}), dst_node_id=node, message_type="query")
                        for node in nodes]
            replies = grid.send_and_receive(messages, timeout=120)
            answers = {{str(r.metadata.src_node_id): r.error.reason if r.has_error() else "ran" for r in replies}}
            Path({str(report)!r}).write_text(json.dumps(answers))
        """))
    return folder


def read_report(report: Path) -> dict[str, str]:
    return json.loads(report.read_text())
