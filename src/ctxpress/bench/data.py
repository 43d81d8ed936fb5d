"""Where the evaluation data lives, and reading it.

The data is real text this project does not ship: Natural Questions with gold
passages and the key-value retrieval set from "Lost in the Middle", and Paul
Graham essays as haystack. It is read from ``--data-dir``, ``$CTXPRESS_DATA``
or a ``shared/data`` directory next to the project checkout.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from ..errors import InputError

NQ_FILE = "nq-open-oracle.dev.jsonl.gz"
KV_FILE = "kv-retrieval-75_keys.dev.jsonl.gz"
ESSAYS_DIR = "pg-essays"
REQUIRED = {"nq": NQ_FILE, "nq-lexical": NQ_FILE, "kv-retrieval": KV_FILE, "niah": ESSAYS_DIR,
            "niah-multikey": ESSAYS_DIR, "variable-tracking": ESSAYS_DIR, "common-words": ESSAYS_DIR}


def candidates() -> list[Path]:
    """Places searched when no directory is given, in order."""
    places = []
    if os.environ.get("CTXPRESS_DATA"):
        places.append(Path(os.environ["CTXPRESS_DATA"]))
    here = Path(__file__).resolve()
    for root in (Path.cwd(), *here.parents):
        places.append(root.parent / "shared" / "data")
        if (root / "pyproject.toml").is_file():
            break
    return places


def find_data_dir(given: str | Path | None, tasks: list[str]) -> Path:
    """The data directory holding every file ``tasks`` need, or a clear error."""
    options = [Path(given).expanduser()] if given else candidates()
    for path in options:
        if all((path / REQUIRED[t]).exists() for t in tasks):
            return path
    wanted = ", ".join(dict.fromkeys(REQUIRED[t] for t in tasks))
    where = str(options[0]) if given else "$CTXPRESS_DATA or ../shared/data"
    raise InputError(f"no evaluation data ({wanted}) in {where}; pass --data-dir DIR")


def _jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_nq(data: Path) -> list[dict]:
    return _jsonl_gz(data / NQ_FILE)


def load_kv(data: Path) -> list[dict]:
    return _jsonl_gz(data / KV_FILE)


def load_essays(data: Path) -> list[str]:
    """The essays, in a fixed (alphabetical) order."""
    return [p.read_text(encoding="utf-8") for p in sorted((data / ESSAYS_DIR).glob("*.txt"))]
