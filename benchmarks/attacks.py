"""The adversarial harness as a report: runs tests/test_adversarial.py (the same attack list CI runs) and prints
the table "attack | expected | outcome" with the figure "attacks tried / refused".

An attack counts as refused when its case passed: the case asserts that the hospital, the aggregator or the
sealed format refused or detected it. `make bench` includes it (benchmarks/run_all.py); alone:
``python benchmarks/attacks.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "test_adversarial.py"


class Collector:
    """The attack, expectation and outcome each case recorded, and whether it passed."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def pytest_runtest_logreport(self, report) -> None:
        props = dict(report.user_properties)
        if report.when == "call" and "attack" in props:
            outcome = props.get("outcome", "") if report.passed else f"NOT REFUSED ({report.outcome})"
            self.rows.append({"attack": props["attack"], "expected": props["expected"], "outcome": outcome,
                              "refused": report.passed})


def run(quick: bool = False) -> dict:
    collector = Collector()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    with tempfile.TemporaryDirectory(prefix="attacks-") as scratch:
        code = pytest.main([str(HARNESS), "-q", "-p", "no:cacheprovider", "--basetemp", scratch, "--rootdir",
                            str(ROOT)], plugins=[collector])
    if not collector.rows or code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"the harness did not run (pytest exit code {code})")
    refused = sum(row["refused"] for row in collector.rows)
    print(table(collector.rows))
    print(f"\nattacks tried / refused: {len(collector.rows)} / {refused}")
    figures: dict = {"attacks_tried": len(collector.rows), "attacks_refused": refused,
                     "attacks tried / refused": f"{len(collector.rows)} / {refused}"}
    figures.update({f"attack: {row['attack']}": row["outcome"] for row in collector.rows})
    return figures


def table(rows: list[dict]) -> str:
    lines = ["| attack | expected | outcome |", "| --- | --- | --- |"]
    lines += [f"| {r['attack']} | {r['expected']} | {r['outcome'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    figures = run()
    sys.exit(0 if figures["attacks_tried"] == figures["attacks_refused"] else 1)
