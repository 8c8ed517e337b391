"""Running the `medsyngan` command in the test's own process, for tests of its output and exit status."""

from __future__ import annotations

import sys

from medsyngan.cli import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `medsyngan ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["medsyngan", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err
