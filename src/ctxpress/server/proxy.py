"""The proxy surface (``ctxpress serve --upstream URL``): compress long messages, then forward upstream.

* ``POST /v1/chat/completions``: messages are compressed under the
  server's policy, overridden by the request's ``prompt_compression``
  (:mod:`ctxpress.messages`); the request, the model name and every field
  ctxpress does not know go upstream as they came. The answer, streamed or
  not, comes back as the upstream sent it, with ``usage.ctxpress`` added
  (the prompt's tokens before and after compression, counted by the
  compressor's tokenizer) and the same counts in ``x-ctxpress-*`` headers.
* ``POST /v1/completions``: the same for a string ``prompt``.
* ``GET /v1/models``: the upstream's list.

Upstream errors come back with the upstream's status and body; an upstream
that does not answer in time is a 504, one that cannot be reached a 502,
both JSON errors. The upstream key is never logged or echoed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..messages import Shrinker, Tally
from ..prompt import PromptCompressor
from ..proxy import Upstream
from ..request import PromptRequest
from .guards import error

PASSED_HEADERS = ("content-type", "x-request-id", "openai-processing-ms", "retry-after")


class Forwarder:
    """One upstream, one connection pool while the app runs, and the server's compression policy."""

    def __init__(self, compressor: PromptCompressor, upstream: Upstream, policy: PromptRequest) -> None:
        self.shrinker, self.upstream, self.policy = Shrinker(compressor), upstream, policy
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

    async def forward(self, path: str, body: dict, tally: Tally) -> Response:
        """POST ``body`` upstream; its answer back with this request's counts added."""
        url = f"{self.upstream.url}/{path}"
        try:
            if body.get("stream"):
                return await self._stream(url, body, tally)
            response = await self.client().post(url, json=body, headers=self.upstream.headers())
        except httpx.HTTPError as exc:
            return self.unreachable(exc)
        if response.status_code >= 400:
            return Response(response.content, response.status_code, _passed(response, tally))
        try:
            answer = response.json()
        except ValueError:
            return Response(response.content, response.status_code, _passed(response, tally))
        if isinstance(answer, dict):
            answer.setdefault("usage", {})
            if isinstance(answer["usage"], dict):
                answer["usage"]["ctxpress"] = tally.usage()
        return JSONResponse(answer, response.status_code, _passed(response, tally))

    async def _stream(self, url: str, body: dict, tally: Tally) -> Response:
        request = self.client().build_request("POST", url, json=body, headers=self.upstream.headers())
        response = await self.client().send(request, stream=True)
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            return Response(content, response.status_code, _passed(response, tally))
        return StreamingResponse(_relay(response, tally), response.status_code, _passed(response, tally),
                                 media_type=response.headers.get("content-type", "text/event-stream"))

    async def models(self) -> Response:
        try:
            response = await self.client().get(f"{self.upstream.url}/models", headers=self.upstream.headers())
        except httpx.HTTPError as exc:
            return self.unreachable(exc)
        return Response(response.content, response.status_code, _passed(response, Tally()))


def _passed(response: httpx.Response, tally: Tally) -> dict[str, str]:
    kept = {k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}
    return {**kept, **tally.headers()}


async def _relay(response: httpx.Response, tally: Tally) -> AsyncIterator[bytes]:
    """The upstream's event stream line by line, ``usage.ctxpress`` added to the chunk that carries usage.

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
        yield f"data: {json.dumps(failure)}\n\n".encode()
    finally:
        await response.aclose()


def _with_usage(line: str, tally: Tally) -> str:
    try:
        payload = json.loads(line[len("data:") :])
    except json.JSONDecodeError:
        return line
    if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
        payload["usage"]["ctxpress"] = tally.usage()
        return "data: " + json.dumps(payload, ensure_ascii=False)
    return line


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
                                                 "user" in policy.roles)
        return await forwarder.forward("completions", body, tally)

    @routes.get("/v1/models")
    async def models() -> Response:
        return await forwarder.models()

    return routes


__all__ = ["PASSED_HEADERS", "Forwarder", "router"]
