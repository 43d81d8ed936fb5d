"""The ``ctxpress`` command line: one module per command, the options they share in :mod:`.groups`."""

from .common import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, read_text
from .main import build_parser, main

__all__ = ["EXIT_INTERRUPTED", "EXIT_RUNTIME", "EXIT_USAGE", "build_parser", "main", "read_text"]
