"""The upstream behind ``ctxpress serve --upstream URL``.

The people who pay per token send their prompts to a hosted or self-hosted
LLM, not to the compressor's small model. In front of it, ctxpress
compresses what is long and passes everything else through untouched: the
routes are :mod:`ctxpress.server.proxy` (OpenAI's API) and
:mod:`ctxpress.server.anthropic` (Anthropic's), the message policy
:mod:`ctxpress.messages`, and a request's ``prompt_compression`` field
overrides the server's policy (a
:class:`~ctxpress.request.PromptRequest`) for that request (``{"rate": 1}``
or ``{"roles": []}`` turns it off). This module imports nothing of the
``serve`` extra, so the command line can check its options without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import InputError

DEFAULT_TIMEOUT = 600.0  # seconds for the upstream's whole answer (a long generation included)
OPENAI_KEY_ENV, ANTHROPIC_KEY_ENV = "OPENAI_API_KEY", "ANTHROPIC_API_KEY"
BEARER, X_API_KEY = "bearer", "x-api-key"  # how an API takes its key: OpenAI's, Anthropic's


@dataclass
class Upstream:
    """The server behind the proxy: OpenAI-compatible, Anthropic's Messages API, or both.

    ``url`` is the API's base URL as the ``openai`` client takes it
    (``https://api.example.com/v1``); ``key`` is read by the command line from
    an environment variable whose name is configured (None or empty: no key
    header is sent).
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

    def headers(self, scheme: str = BEARER) -> dict[str, str]:
        """The key as the API takes it: ``Authorization: Bearer`` (OpenAI's routes) or ``x-api-key`` (Anthropic's)."""
        if scheme not in (BEARER, X_API_KEY):
            raise ValueError(f"unknown key scheme {scheme!r}")
        if not self.key:
            return {}
        return {"x-api-key": self.key} if scheme == X_API_KEY else {"Authorization": f"Bearer {self.key}"}


def default_key_env(url: str) -> str:
    """Where the upstream's key is read from unless configured: the provider's own variable.

    Anthropic's API gets ``$ANTHROPIC_API_KEY``, anything else ``$OPENAI_API_KEY``,
    so an OpenAI key is never sent to Anthropic by default (or the reverse).
    """
    return ANTHROPIC_KEY_ENV if urlsplit(url or "").hostname == "api.anthropic.com" else OPENAI_KEY_ENV


def parse_roles(text: str) -> tuple[str, ...]:
    """``--compress-roles`` (comma-separated role names, may be empty) as a tuple."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


__all__ = ["ANTHROPIC_KEY_ENV", "BEARER", "DEFAULT_TIMEOUT", "OPENAI_KEY_ENV", "X_API_KEY", "Upstream",
           "default_key_env", "parse_roles"]
