"""Helpers shared by the benchmark scripts: data, isolated runs, tables.

Every measurement runs in a fresh child process, so that its peak memory
(``ru_maxrss``) is its own and an out-of-memory run cannot take the others
down with it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from ctxpress.bench.data import find_data_dir, load_essays
from ctxpress.errors import InputError
from ctxpress.memory import rss_bytes

__all__ = ["available_bytes", "data_dir", "essays_text", "markdown_table", "peak_rss_bytes", "press", "rss_bytes",
           "run_child"]


def data_dir(arg: str | None) -> Path:
    """The evaluation data (the essays), as ``ctxpress bench`` finds it, or exit with its message."""
    try:
        return find_data_dir(arg, ["niah"])
    except InputError as exc:
        sys.exit(f"benchmark: {exc}")


def essays_text(data: Path) -> str:
    """All essays, in a fixed order, as one long real text."""
    return "\n\n".join(load_essays(data))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run ``script --child ...`` in a fresh interpreter; return the JSON it prints last."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": tail[0] if proc.returncode > 0 else f"killed by signal {-proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def press(method: str, ratio: float):
    """The press a method spec names (``NAME[:KEY=VALUE...]``), at ``ratio`` where it takes a budget."""
    from ctxpress.kv import PRESSES, press_with_budget
    from ctxpress.options import parse_options

    name, *options = method.split(":")
    options = parse_options(options)
    takes = name in PRESSES and PRESSES[name].takes_budget(options)  # an unknown name fails in press_with_budget
    return press_with_budget(name, ratio if takes else None, None, options)
