"""Everything between the network and a route: body size, API key, queue bound, and the JSON error bodies.

Every error is ``{"error": {"message", "type"}}`` with a 4xx status when the
client can fix it (400 for any :class:`~ctxpress.errors.CtxpressError`), 504
past the time limit and 500 for a bug, so a client never sees a traceback.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import CtxpressError
from ..guard import Admission, ApiKey
from .deadline import ClientGone, RequestTimedOut


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """The one shape of every error body."""
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413, whether declared or streamed.

    The body is read (up to the limit) before the application sees it, then
    handed over in one piece; later receives (disconnects) pass through.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error(413, f"request body over {self.limit} bytes", "request_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def add_guards(app: FastAPI, *, max_request_bytes: int, max_queue: int | None, api_key: str | None) -> None:
    """The middleware, in the order that matters: the key is checked before a request takes a place in the
    queue, and the queue before the body is read (the last added runs first)."""
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if max_queue is not None:
        app.add_middleware(Admission, max_queue=max_queue)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")


async def _user_error(request: Request, exc: CtxpressError) -> JSONResponse:
    return error(400, str(exc))


async def _timed_out(request: Request, exc: RequestTimedOut) -> JSONResponse:
    return error(504, str(exc), "timeout")


async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
    return error(499, "the client closed the connection", "client_closed")  # read by nobody; logged


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


ERROR_HANDLERS = {RequestValidationError: _invalid, CtxpressError: _user_error, RequestTimedOut: _timed_out,
                  ClientGone: _gone, HTTPException: _http_error, Exception: _crash}


def add_error_handlers(app: FastAPI) -> None:
    """JSON error bodies for everything a route can raise (the most specific class wins)."""
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)


__all__ = ["ERROR_HANDLERS", "BodyLimit", "add_error_handlers", "add_guards", "error"]
