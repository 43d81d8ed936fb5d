"""Process memory: the peak of a block of work (the CUDA allocator's, or the
resident size sampled in a background thread on CPU), and, for long-lived
processes, how glibc hands freed memory back to the system."""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading

import torch

from .errors import InputError


def rss_bytes() -> int:
    """Current resident memory of this process (Linux); the peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BLOCK = 1 << 20  # bytes; at glibc's initial 128 KiB, mapping every small activation cost 10% of throughput


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


THRESHOLD_ENV = "CTXPRESS_MMAP_THRESHOLD"  # bytes; 0 keeps glibc's own rule


def map_large_blocks(threshold: int | None = None) -> bool:
    """Give every allocation above ``threshold`` bytes a mapping of its own, unmapped when freed.

    glibc starts with this rule but raises the threshold after each large
    free (up to 32 MiB), so a long-lived process that keeps allocating
    tensors of many sizes soon takes them from its heap, which they
    fragment: after a burst of requests the server's resident size stayed
    290-370 MiB above its warm baseline even after ``malloc_trim``. A fixed
    threshold of 1 MiB leaves 50-70 MiB and lowers the peak by 500-600 MiB,
    for 2-7% of the throughput (the README's load test). Call it before the model
    loads; returns whether glibc took it (False elsewhere, or with a
    threshold of 0). ``threshold`` None: ``$CTXPRESS_MMAP_THRESHOLD`` if set,
    else ``LARGE_BLOCK``.
    """
    if threshold is None:
        setting = os.environ.get(THRESHOLD_ENV, "").strip()
        try:
            threshold = int(setting) if setting else LARGE_BLOCK
        except ValueError:
            raise InputError(f"${THRESHOLD_ENV} must be a number of bytes, got {setting!r}") from None
    if threshold <= 0:
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_freed() -> bool:
    """Hand memory that Python and torch have freed back to the operating system (glibc's ``malloc_trim``).

    Freed blocks otherwise stay in the allocator's per-thread arenas, so a
    server's resident size stays at its peak long after the load is gone.
    Returns whether it could ask: False where there is no glibc (macOS,
    musl), which has nothing to ask.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)  # 1 if memory went back, 0 if there was none to give: both fine
    return True


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
