"""``ctxpress serve``: prompt compression and an OpenAI-compatible chat endpoint over HTTP.

* ``POST /v1/compress`` takes the options of ``ctxpress compress --json`` and
  returns the same fields (:mod:`.compress`).
* ``POST /v1/chat/completions`` answers with the local model, streaming or
  not, in OpenAI's format (:mod:`.chat`). Two extra request fields
  (``extra_body`` in the ``openai`` client) turn compression on:
  ``prompt_compression`` (long messages are compressed, as the proxy does:
  :mod:`ctxpress.messages`) and ``kv_compression`` (a KV press for this
  generation). ``usage`` reports the prompt tokens before and after
  compression.
* ``GET /healthz``, ``GET /v1/models``; OpenAPI docs at ``/docs``.
* ``GET /metrics``: requests, tokens and latencies for Prometheus (:mod:`.metrics`).
* With ``upstream``, chat and completions go to another OpenAI-compatible
  API after compression instead (:mod:`.proxy`), and ``POST /v1/messages``
  to Anthropic's (:mod:`.anthropic`).

The model is loaded once; requests take turns on it (its lock), so
concurrent clients queue instead of failing, up to ``max_queue`` waiting
(then 429 with ``Retry-After``). An API key can be required
(:mod:`ctxpress.guard`). Bodies are size-limited and every error is a JSON
body with a 4xx (the client's fault) or 500 status (:mod:`.guards`).

The application's modules are imported on first use, so the command line
reads :mod:`.settings` without the ``serve`` extra installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from .settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
)

_HOMES = {"create_app": "app", "serve": "run", "serving": "run", "BodyLimit": "guards", "Deadline": "deadline",
          "RequestTimedOut": "deadline", "ClientGone": "deadline", "ChatPlan": "chat", "ChatService": "chat",
          "ChatBody": "schemas", "CompressBody": "schemas", "Message": "schemas", "KVCompression": "schemas"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_HOST", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_PORT",
           "DEFAULT_REQUEST_TIMEOUT", *_HOMES]
