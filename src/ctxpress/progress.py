"""Progress bars on stderr, the same way everywhere."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, enabled: bool | None, desc: str, unit: str = "tok") -> tqdm:
    """A tqdm bar on stderr. ``enabled``: True always, False never, None only on a
    terminal and only once the work has lasted a second (short calls stay quiet)."""
    disable = True if not total else (None if enabled is None else not enabled)
    return tqdm(total=total, unit=unit, desc=desc, disable=disable, leave=False,
                delay=0 if enabled else 1.0, dynamic_ncols=True)
