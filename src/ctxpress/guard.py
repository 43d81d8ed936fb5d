"""What stands between the network and the model: an API key and a bounded queue.

Both are plain ASGI middleware, so they answer before any request body is
parsed or any model work is queued:

* :class:`ApiKey` requires ``Authorization: Bearer KEY`` (as OpenAI-compatible
  servers do) or ``x-api-key: KEY`` (what the ``anthropic`` client sends),
  compared in constant time; ``/healthz`` stays open for load balancers. The
  key is never logged or echoed.
* :class:`Admission` bounds the requests that wait for the one model: when
  ``max_queue`` already wait behind the one being served, the next is
  answered 429 with ``Retry-After`` at once, instead of piling up work that
  will time out anyway. A request holds its place until its response (a
  stream too) has ended, or its client has gone. When the last request
  leaves, the memory freed meanwhile is handed back to the system.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from .memory import release_freed

API_KEY_ENV = "CTXPRESS_API_KEY"  # where ``ctxpress serve`` reads the key by default
DEFAULT_MAX_QUEUE = 32
OPEN_PATHS = frozenset({"/healthz"})
MODEL_PATHS = frozenset({"/v1/compress", "/v1/chat/completions", "/v1/completions", "/v1/messages"})


async def send_error(send, status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


class ApiKey:
    """Refuse every request but ``/healthz`` without ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (401)."""

    def __init__(self, app, key: str) -> None:
        if not key:
            raise ValueError("an empty API key would let everyone in")
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        # both compared, always (``|``, not ``or``): the time taken says nothing about either header
        by_bearer = hmac.compare_digest(headers.get(b"authorization", b""), b"Bearer " + self.key)
        if not (by_bearer | hmac.compare_digest(headers.get(b"x-api-key", b""), self.key)):
            return await send_error(send, 401, "missing or wrong API key (Authorization: Bearer ... or x-api-key)",
                                    "authentication_error", {"WWW-Authenticate": "Bearer"})
        return await self.app(scope, receive, send)


class Admission:
    """At most one request served and ``max_queue`` waiting on the model; beyond that 429."""

    def __init__(self, app, max_queue: int, retry_after: int = 1) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.app, self.max_queue, self.retry_after = app, max_queue, retry_after
        self.active = 0  # served + waiting; the event loop is single-threaded, so no lock is needed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in MODEL_PATHS:
            return await self.app(scope, receive, send)
        if self.active > self.max_queue:
            return await send_error(send, 429, f"server busy: {self.active - 1} requests already waiting",
                                    "rate_limit_error", {"Retry-After": str(self.retry_after)})
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if self.active == 0:  # idle: the memory the burst took goes back to the system, off the event loop
                asyncio.get_running_loop().run_in_executor(None, release_freed)


__all__ = ["API_KEY_ENV", "DEFAULT_MAX_QUEUE", "MODEL_PATHS", "OPEN_PATHS", "Admission", "ApiKey"]
