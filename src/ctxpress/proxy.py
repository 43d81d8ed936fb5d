"""The upstream behind ``ctxpress serve --upstream URL``.

The people who pay per token send their prompts to a hosted or self-hosted
LLM, not to the compressor's small model. In front of it, ctxpress
compresses what is long and passes everything else through untouched: the
routes are :mod:`ctxpress.server.proxy`, the message policy
:mod:`ctxpress.messages`, and a request's ``prompt_compression`` field
overrides the server's policy (a
:class:`~ctxpress.request.PromptRequest`) for that request (``{"rate": 1}``
or ``{"roles": []}`` turns it off). This module imports nothing of the
``serve`` extra, so the command line can check its options without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError

DEFAULT_TIMEOUT = 600.0  # seconds for the upstream's whole answer (a long generation included)


@dataclass
class Upstream:
    """The OpenAI-compatible server behind the proxy.

    ``url`` is the API's base URL as the ``openai`` client takes it
    (``https://api.example.com/v1``); ``key`` is read by the command line from
    an environment variable whose name is configured (None or empty: no
    ``Authorization`` header).
    """

    url: str
    key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url or ""):
            raise InputError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8001/v1, got {self.url!r}")
        self.url = self.url.rstrip("/")
        if self.timeout <= 0:
            raise InputError(f"the upstream timeout must be positive, got {self.timeout!r}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


def parse_roles(text: str) -> tuple[str, ...]:
    """``--compress-roles`` (comma-separated role names, may be empty) as a tuple."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


__all__ = ["DEFAULT_TIMEOUT", "Upstream", "parse_roles"]
