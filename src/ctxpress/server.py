"""``ctxpress serve``: prompt compression and an OpenAI-compatible chat endpoint over HTTP.

* ``POST /v1/compress`` takes the options of ``ctxpress compress --json`` and
  returns the same fields.
* ``POST /v1/chat/completions`` answers with the local model, streaming or
  not, in OpenAI's format. Two extra request fields (``extra_body`` in the
  ``openai`` client) turn compression on: ``prompt_compression`` (messages
  longer than ``min_tokens`` are compressed) and ``kv_compression`` (a KV
  press for this generation). ``usage`` reports the prompt tokens before and
  after compression.
* ``GET /healthz``, ``GET /v1/models``; OpenAPI docs at ``/docs``.
* With ``upstream``, chat and completions go to another OpenAI-compatible
  API after compression instead (:mod:`ctxpress.proxy`).

The model is loaded once; requests take turns on it (its lock), so
concurrent clients queue instead of failing, up to ``max_queue`` waiting
(then 429 with ``Retry-After``). An API key can be required
(:mod:`ctxpress.guard`). Bodies are size-limited and every error is a JSON
body with a 4xx (the client's fault) or 500 status.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from . import __version__
from .chat import chat_ids
from .errors import CtxpressError, InputError
from .guard import DEFAULT_MAX_QUEUE, Admission, ApiKey
from .kv import DEFAULT_METHOD as DEFAULT_KV
from .kv import CompressedContext, KVPress, press_with_budget
from .models import LoadedModel
from .prompt import PromptCompressor
from .prompt.methods import DEFAULT_METHOD, build_method
from .proxy import Policy, Upstream, install

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT = 300.0  # seconds from arrival, queueing included


class CompressBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: str | list[str]
    rate: float | None = None
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    question: str = ""
    instruction: str = ""
    force_tokens: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict, description="method options, e.g. {'stages': 4}")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class PromptCompression(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float | None = None
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    min_tokens: int = Field(256, ge=1, description="only messages longer than this are compressed")
    options: dict[str, Any] = Field(default_factory=dict)


class KVCompression(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = DEFAULT_KV
    ratio: float | None = None
    tokens: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields (user, seed, ...) a local model ignores
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    prompt_compression: PromptCompression | None = None
    kv_compression: KVCompression | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
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
        too_large = _error(413, f"request body over {self.limit} bytes", "request_too_large")
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


class RequestTimedOut(CtxpressError):
    """A request ran past the server's time limit (answered 504)."""


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


class Deadline:
    """One request's time limit and its client's presence.

    Waiting for the model gives up, and generation stops at the next token,
    once the limit has passed or the client has gone; a forward pass already
    running (prompt compression, prefill) finishes first.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self.gone = threading.Event()

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def over(self) -> bool:
        return self.gone.is_set() or self.expired()

    def check(self) -> None:
        if self.gone.is_set():
            raise ClientGone
        if self.expired():
            raise RequestTimedOut(f"the request ran past this server's time limit of {self.seconds:g} s")

    @contextmanager
    def holding(self, lock: threading.RLock) -> Iterator[None]:
        """Hold ``lock`` (the model), giving up when the request is over."""
        while not lock.acquire(timeout=0.1):
            self.check()
        try:
            self.check()
            yield
        finally:
            lock.release()


class _Stop(StoppingCriteria):
    """Stops generation when the request's deadline has passed or its client has gone."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.deadline.over(), dtype=torch.bool, device=input_ids.device)


async def _watched(request: Request, deadline: Deadline, fn, *args):
    """``fn(*args)`` on a worker thread; if the client disconnects meanwhile, the deadline learns it."""
    work = asyncio.ensure_future(run_in_threadpool(fn, *args))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if not deadline.gone.is_set() and await request.is_disconnected():
                deadline.gone.set()
    except asyncio.CancelledError:  # cancelled from outside (Ray Serve, when the client went): stop the work too
        deadline.gone.set()
        raise


@dataclass
class ChatPlan:
    """A chat request made ready for the model: its (compressed) prompt, press and token limit."""

    ids: torch.Tensor  # (1, n) prompt token ids, after prompt compression
    tokens_before: int  # prompt tokens before prompt compression
    press: KVPress
    limit: int  # new tokens at most


def create_app(lm: LoadedModel, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens: int = 1024, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               max_queue: int | None = DEFAULT_MAX_QUEUE, upstream: Upstream | None = None,
               policy: Policy | None = None) -> FastAPI:
    """The HTTP application around one loaded model.

    ``api_key``: required as ``Authorization: Bearer`` (None: open).
    ``max_queue``: requests that may wait behind the one served (None: no bound).
    ``request_timeout``: seconds from arrival, queueing included, before a
    request is answered 504 (a stream ends with ``finish_reason`` ``length``);
    None: no limit.
    ``upstream``: forward chat and completions there after compressing long
    messages under ``policy`` (:mod:`ctxpress.proxy`) instead of answering
    with the local model.
    """
    app = FastAPI(title="ctxpress", version=__version__,
                  description="Prompt compression (DAC) and KV-cache compression (SpindleKV) for LLM inference.")
    # The last added runs first: the key is checked before a request takes a place in the queue.
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    if max_queue is not None:
        app.add_middleware(Admission, max_queue=max_queue)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)
    compressor = PromptCompressor(lm, progress=False)
    tokenizer = lm.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}")

    @app.exception_handler(CtxpressError)
    async def user_error(request: Request, exc: CtxpressError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestTimedOut)
    async def timed_out(request: Request, exc: RequestTimedOut) -> JSONResponse:
        return _error(504, str(exc), "timeout")

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> JSONResponse:
        return _error(499, "the client closed the connection", "client_closed")  # read by nobody; logged

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/healthz")
    def healthz() -> dict:
        # pid: which process (replica) answered, behind ``--replicas``
        return {"status": "ok", "model": lm.name, "pid": os.getpid(),
                **({"upstream": upstream.url} if upstream else {})}

    @app.post("/v1/compress")
    async def compress(body: CompressBody, request: Request) -> dict:
        deadline = Deadline(request_timeout)
        budget = {"rate": body.rate, "target_tokens": body.target_tokens}
        method = build_method(body.method, **body.options)  # any option name: an InputError, not a TypeError

        def work() -> dict:
            with deadline.holding(lm.lock):
                return compressor.compress(body.context, method=method, question=body.question,
                                           instruction=body.instruction, force_tokens=body.force_tokens,
                                           **budget).to_dict()

        return await _watched(request, deadline, work)

    if upstream is not None:
        install(app, compressor, upstream, policy or Policy())
        return app

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": lm.name, "object": "model", "owned_by": "ctxpress"}]}

    def prepare(body: ChatBody) -> ChatPlan:
        """Compress long messages, tokenize the chat, pick the press and the token limit."""
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        before = chat_ids(tokenizer, messages)
        pc = body.prompt_compression
        if pc is not None:
            method = build_method(pc.method, **pc.options)  # checked even when no message is long enough
            for message in messages:
                if message["role"] != "assistant" and compressor.count_tokens(message["content"]) > pc.min_tokens:
                    result = compressor.compress(message["content"], rate=pc.rate, target_tokens=pc.target_tokens,
                                                 method=method)
                    message["content"] = result.compressed_text
        ids = chat_ids(tokenizer, messages) if pc is not None else before
        kv = body.kv_compression
        press = press_with_budget(kv.method, kv.ratio, kv.tokens, kv.options) if kv else press_with_budget("full")
        limit = body.max_completion_tokens or body.max_tokens or min(256, max_new_tokens)
        if limit > max_new_tokens:
            raise InputError(f"max_tokens {limit} is over this server's limit of {max_new_tokens}")
        if ids.shape[1] + limit > lm.max_positions:
            raise InputError(f"prompt ({ids.shape[1]} tokens) plus max_tokens ({limit}) exceed the model's "
                             f"{lm.max_positions}-token window")
        return ChatPlan(ids, int(before.shape[1]), press, limit)

    def usage(plan: ChatPlan, ctx: CompressedContext, completion: int) -> dict:
        prompt = int(plan.ids.shape[1])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_before_compression": int(plan.tokens_before),
                "kv_cache_bytes": ctx.cache_bytes, "kv_full_cache_bytes": ctx.full_cache_bytes}

    def answer(body: ChatBody, plan: ChatPlan, deadline: Deadline,
               streamer=None) -> tuple[CompressedContext, torch.Tensor]:
        """Prefill all but the prompt's last token into the planned cache, then generate (model lock held)."""
        with deadline.holding(lm.lock):
            ctx = CompressedContext(lm, plan.ids[:, :-1], plan.press)
            new, _ = ctx.generate(plan.ids[:, -1:], plan.limit, temperature=body.temperature, top_p=body.top_p,
                                  streamer=streamer, stopping=StoppingCriteriaList([_Stop(deadline)]))
        return ctx, new

    def planned(body: ChatBody, deadline: Deadline) -> ChatPlan:
        with deadline.holding(lm.lock):  # prompt compression runs on the model too
            return prepare(body)

    def respond(body: ChatBody, plan: ChatPlan, deadline: Deadline, ident: str, created: int, name: str) -> dict:
        ctx, new = answer(body, plan, deadline)
        deadline.check()  # an answer cut by the time limit is an error, not a short answer
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": tokenizer.decode(new, skip_special_tokens=True)},
                         "finish_reason": _finish(tokenizer, new, plan.limit)}],
            "usage": usage(plan, ctx, len(new)),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        deadline = Deadline(request_timeout)
        plan = await _watched(request, deadline, planned, body, deadline)
        created, ident = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        name = body.model or lm.name
        if body.stream:
            return StreamingResponse(stream(body, plan, deadline, ident, created, name),
                                     media_type="text/event-stream")
        return await _watched(request, deadline, respond, body, plan, deadline, ident, created, name)

    def stream(body: ChatBody, plan: ChatPlan, deadline: Deadline, ident: str, created: int,
               name: str) -> Iterator[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["ctx"], outcome["new"] = answer(body, plan, deadline, streamer=streamer)
            except Exception as exc:  # reported to the client as a final error event
                outcome["error"] = exc
                streamer.end()

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield chunk({"role": "assistant", "content": ""})
            for text in streamer:
                if text:
                    yield chunk({"content": text})
            worker.join()
            if "error" in outcome:
                yield f"data: {json.dumps({'error': {'message': str(outcome['error']), 'type': 'server_error'}})}\n\n"
            else:
                new = outcome["new"]  # cut by the time limit: the stream still ends cleanly, as "length"
                yield chunk({}, "length" if deadline.expired() else _finish(tokenizer, new, plan.limit))
                if (body.stream_options or {}).get("include_usage"):
                    payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                               "choices": [], "usage": usage(plan, outcome["ctx"], len(new))}
                    yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            deadline.gone.set()  # a client that left stops the generation at the next token

    return app


def _finish(tokenizer, new: torch.Tensor, limit: int) -> str:
    ended = len(new) > 0 and int(new[-1]) == tokenizer.eos_token_id
    return "length" if len(new) >= limit and not ended else "stop"


def serve(lm: LoadedModel, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the service until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lm, **options), host=host, port=port, log_level="info")


@contextmanager
def serving(app, host: str = "127.0.0.1") -> Iterator[str]:
    """A real uvicorn server for ``app`` in a background thread on a free port; yields its base URL.

    For tests and benchmarks that talk HTTP to an app in the same process.
    """
    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise CtxpressError(f"the server on {host}:{port} did not start within 30 s")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
