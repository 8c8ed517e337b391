#!/usr/bin/env python
"""Rewrite the configuration reference of docs/configuration.md (between the config-reference markers) from the schema.

The block is the output of `medsyngan config reference`; tests/test_readme.py fails while the two differ.
Usage: .venv/bin/python scripts/update-readme-config.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from medsyngan.config import schema_markdown
from medsyngan.rundir import atomic_write_text

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> int:
    text = REFERENCE.read_text()
    if text.count(START) != 1 or text.count(END) != 1:
        print(f"error: {REFERENCE} must hold exactly one {START} … {END} pair; put them back around the reference",
              file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    updated = f"{head}{START}\n{schema_markdown()}\n{END}{tail}"
    if updated == text:
        print(f"{REFERENCE.name}: the configuration reference is up to date")
        return 0
    atomic_write_text(REFERENCE, updated)
    print(f"{REFERENCE.name}: the configuration reference was rewritten from the schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())
