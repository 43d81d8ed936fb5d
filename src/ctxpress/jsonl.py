"""Append-only JSON-lines files that survive interruption."""

from __future__ import annotations

import json
from pathlib import Path


def complete_lines(path: Path) -> int:
    """Number of complete lines; a last line cut by an interruption is removed first,
    so that appending continues on a clean line."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as fh:
            fh.truncate(keep)
    return data[:keep].count(b"\n")


def read_records(path: Path) -> list[dict]:
    """The complete JSON lines of ``path`` (none if it does not exist)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
