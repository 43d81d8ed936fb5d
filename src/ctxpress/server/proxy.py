"""The proxy surface (``ctxpress serve --upstream URL``): compress long messages, then forward upstream.

* ``POST /v1/chat/completions``: messages are compressed under the
  server's policy, overridden by the request's ``prompt_compression``
  (:mod:`ctxpress.messages`); the request, the model name and every field
  ctxpress does not know go upstream as they came. The answer, streamed or
  not, comes back as the upstream sent it, with ``usage.ctxpress`` added
  (the prompt's tokens before and after compression, counted by the
  compressor's tokenizer) and the same counts in ``x-ctxpress-*`` headers.
* ``POST /v1/completions``: the same for a string ``prompt``.
* ``GET /v1/models``: the upstream's list (asked as Anthropic's API when the
  client sent ``anthropic-version``, as the ``anthropic`` client does).

Upstream errors come back with the upstream's status and body; an upstream
that does not answer in time is a 504, one that cannot be reached a 502,
both JSON errors. The upstream key is never logged or echoed.

:class:`Forwarder` is shared with Anthropic's route (:mod:`.anthropic`): one
connection pool and one policy; a :class:`Wire` says what differs between
the two APIs on the wire.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..messages import Shrinker, Tally
from ..prompt import PromptCompressor
from ..proxy import BEARER, X_API_KEY, Upstream
from ..request import PromptRequest
from .guards import error
from .metrics import Metrics

PASSED_HEADERS = ("content-type", "x-request-id", "request-id", "openai-processing-ms", "retry-after")


def _openai_error_event(failure: dict) -> str:
    return f"data: {json.dumps(failure)}\n\n"


def _anthropic_error_event(failure: dict) -> str:
    return f"event: error\ndata: {json.dumps({'type': 'error', **failure})}\n\n"


@dataclass(frozen=True)
class Wire:
    """What differs between the upstream APIs on the wire; everything else about forwarding is shared."""

    scheme: str = BEARER  # how the upstream key is sent (:meth:`ctxpress.proxy.Upstream.headers`)
    passed_on: tuple[str, ...] = ()  # the client's request headers sent upstream as they came
    error_event: Callable[[dict], str] = _openai_error_event  # how a stream says it broke off


OPENAI = Wire()
ANTHROPIC = Wire(X_API_KEY, ("anthropic-version", "anthropic-beta"), _anthropic_error_event)


class Forwarder:
    """One upstream, one connection pool while the app runs, and the server's compression policy."""

    def __init__(self, compressor: PromptCompressor, upstream: Upstream, policy: PromptRequest,
                 metrics: Metrics | None = None) -> None:
        self.shrinker, self.upstream, self.policy = Shrinker(compressor), upstream, policy
        self.metrics = metrics or Metrics()
        self.timeout = httpx.Timeout(upstream.timeout, connect=min(10.0, upstream.timeout))
        self.pool: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: one shared client, closed when the app stops."""
        async with httpx.AsyncClient(timeout=self.timeout) as shared:
            self.pool["client"] = shared
            yield
        self.pool.clear()

    def client(self) -> httpx.AsyncClient:
        if "client" not in self.pool:  # an app driven without its lifespan (some test clients)
            self.pool["client"] = httpx.AsyncClient(timeout=self.timeout)
        return self.pool["client"]

    async def body_of(self, request: Request) -> tuple[dict, PromptRequest]:
        """The request's JSON object, ``prompt_compression`` taken out of it as this request's policy."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        if "kv_compression" in body:
            raise InputError("kv_compression applies to the local model; this server forwards to an upstream API")
        return body, self.policy.overridden(body.pop("prompt_compression", None))

    def unreachable(self, exc: httpx.HTTPError) -> JSONResponse:
        if isinstance(exc, httpx.TimeoutException):
            return error(504, f"the upstream did not answer within {self.upstream.timeout:g} s", "upstream_timeout")
        return error(502, f"the upstream at {self.upstream.url} cannot be reached ({type(exc).__name__})",
                     "upstream_unreachable")

    async def forward(self, path: str, body: dict, tally: Tally, wire: Wire = OPENAI,
                      asked: Mapping[str, str] | None = None) -> Response:
        """POST ``body`` (compressed, ``tally`` complete) upstream; its answer back with the counts added.

        ``asked``: the client's request headers, of which ``wire.passed_on`` go upstream.
        """
        self.metrics.compression(tally)
        url = f"{self.upstream.url}/{path}"
        headers = self.headers(wire, asked)
        start = time.perf_counter()
        try:
            if body.get("stream"):
                return await self._stream(url, body, tally, headers, wire, start)
            response = await self.client().post(url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return self.unreachable(exc)
        self._waited(tally, start)
        if response.status_code >= 400:
            return Response(response.content, response.status_code, _passed(response, tally))
        try:
            answer = response.json()
        except ValueError:
            return Response(response.content, response.status_code, _passed(response, tally))
        if isinstance(answer, dict):
            answer.setdefault("usage", {})
            _stamp(answer, tally)
        return JSONResponse(answer, response.status_code, _passed(response, tally))

    async def _stream(self, url: str, body: dict, tally: Tally, headers: dict[str, str], wire: Wire,
                      start: float) -> Response:
        request = self.client().build_request("POST", url, json=body, headers=headers)
        response = await self.client().send(request, stream=True)
        self._waited(tally, start)  # to the response headers: the wait before the first token
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            return Response(content, response.status_code, _passed(response, tally))
        return StreamingResponse(_relay(response, tally, wire), response.status_code, _passed(response, tally),
                                 media_type=response.headers.get("content-type", "text/event-stream"))

    def _waited(self, tally: Tally, start: float) -> None:
        """The upstream answered (a stream: its headers): its latency, on the request and in the metrics."""
        tally.upstream_seconds = time.perf_counter() - start
        self.metrics.upstream_seconds.observe(tally.upstream_seconds)

    def headers(self, wire: Wire, asked: Mapping[str, str] | None) -> dict[str, str]:
        """The upstream's key as its API takes it, and the client's headers that API needs."""
        return {**{k: asked[k] for k in wire.passed_on if asked and k in asked}, **self.upstream.headers(wire.scheme)}

    async def models(self, asked: Mapping[str, str]) -> Response:
        wire = ANTHROPIC if "anthropic-version" in asked else OPENAI
        try:
            response = await self.client().get(f"{self.upstream.url}/models", headers=self.headers(wire, asked))
        except httpx.HTTPError as exc:
            return self.unreachable(exc)
        return Response(response.content, response.status_code, _passed(response, Tally()))


def _passed(response: httpx.Response, tally: Tally) -> dict[str, str]:
    kept = {k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}
    return {**kept, **tally.headers()}


async def _relay(response: httpx.Response, tally: Tally, wire: Wire) -> AsyncIterator[bytes]:
    """The upstream's event stream line by line, ``usage.ctxpress`` added to the events that carry usage.

    The upstream response is closed when the stream ends or the client leaves.
    """
    try:
        async for line in response.aiter_lines():
            if line.startswith("data:") and '"usage"' in line:
                line = _with_usage(line, tally)
            yield (line + "\n").encode()
    except httpx.HTTPError as exc:
        failure = {"error": {"message": f"the upstream stream broke off ({type(exc).__name__})",
                             "type": "upstream_unreachable"}}
        yield wire.error_event(failure).encode()
    finally:
        await response.aclose()


def _with_usage(line: str, tally: Tally) -> str:
    try:
        payload = json.loads(line[len("data:") :])
    except json.JSONDecodeError:
        return line
    return "data: " + json.dumps(payload, ensure_ascii=False) if _stamp(payload, tally) else line


def _stamp(payload: object, tally: Tally) -> bool:
    """``usage.ctxpress`` added wherever ``payload`` carries usage; whether it did.

    Top-level ``usage``: OpenAI's answers and last chunk, Anthropic's answer and
    ``message_delta`` event; ``message.usage``: Anthropic's ``message_start``.
    """
    holders = [payload, payload.get("message")] if isinstance(payload, dict) else []
    stamped = [h["usage"] for h in holders if isinstance(h, dict) and isinstance(h.get("usage"), dict)]
    for usage in stamped:
        usage["ctxpress"] = tally.usage()
    return bool(stamped)


def router(forwarder: Forwarder) -> APIRouter:
    """The proxy's routes; the app's lifespan must be ``forwarder.lifespan`` (see :func:`.app.create_app`)."""
    routes = APIRouter()

    @routes.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, policy = await forwarder.body_of(request)
        tally = Tally()
        body["messages"] = await run_in_threadpool(forwarder.shrinker.messages, body.get("messages"), policy, tally)
        return await forwarder.forward("chat/completions", body, tally)

    @routes.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, policy = await forwarder.body_of(request)
        tally = Tally()
        if not isinstance(body.get("prompt"), str):
            raise InputError("prompt must be a string (lists of prompts or token ids are not compressed)")
        body["prompt"] = await run_in_threadpool(forwarder.shrinker.text, body["prompt"], policy, tally,
                                                 "user" in policy.roles, True)  # a prompt ends with its question
        return await forwarder.forward("completions", body, tally)

    @routes.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forwarder.models(request.headers)

    return routes


__all__ = ["ANTHROPIC", "OPENAI", "PASSED_HEADERS", "Forwarder", "Wire", "router"]
