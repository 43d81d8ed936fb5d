"""Peak memory of a block of work: the CUDA allocator's peak, or the process's
resident memory sampled in a background thread on CPU."""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading

import torch


def rss_bytes() -> int:
    """Current resident memory of this process (Linux); the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def release_freed() -> bool:
    """Hand memory that Python and torch have freed back to the operating system (glibc's ``malloc_trim``).

    Freed blocks otherwise stay in the allocator's per-thread arenas, so a
    server's resident size stays at its peak long after the load is gone.
    Returns whether it could ask: False where there is no glibc (macOS,
    musl), which has nothing to ask.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # 1 if memory went back, 0 if there was none to give: both fine
        return True
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``.

    On CUDA: ``torch.cuda.max_memory_allocated`` over the block. On CPU: the
    highest resident set size seen, sampled every ``interval`` seconds (a
    short spike between samples can be missed; the block's start and end are
    always sampled).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.bytes = rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self.bytes, rss_bytes())
