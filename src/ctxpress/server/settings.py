"""The service's defaults, readable without the ``serve`` extra (the command line shows them in its help)."""

from __future__ import annotations

DEFAULT_HOST = "127.0.0.1"  # this machine only
DEFAULT_PORT = 8000
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NEW_TOKENS = 1024  # the largest max_tokens a chat request may ask for
DEFAULT_REQUEST_TIMEOUT = 300.0  # seconds from arrival, queueing included

__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_PORT",
           "DEFAULT_REQUEST_TIMEOUT"]
