"""The application: one loaded model, the guards, and one router per surface."""

from __future__ import annotations

from fastapi import FastAPI

from .. import __version__
from ..guard import DEFAULT_MAX_QUEUE
from ..models import LoadedModel
from ..prompt import PromptCompressor
from ..proxy import Upstream
from ..request import PromptRequest
from . import chat, compress, health, proxy
from .guards import add_error_handlers, add_guards
from .settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT


def create_app(lm: LoadedModel, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               max_queue: int | None = DEFAULT_MAX_QUEUE, upstream: Upstream | None = None,
               policy: PromptRequest | None = None) -> FastAPI:
    """The HTTP application around one loaded model.

    ``api_key``: required as ``Authorization: Bearer`` (None: open).
    ``max_queue``: requests that may wait behind the one served (None: no bound).
    ``request_timeout``: seconds from arrival, queueing included, before a
    request is answered 504 (a stream ends with ``finish_reason`` ``length``);
    None: no limit.
    ``upstream``: forward chat and completions there after compressing long
    messages under ``policy`` (:mod:`ctxpress.server.proxy`) instead of
    answering with the local model. ``policy`` is also what a local chat
    request's ``prompt_compression`` fields override.
    """
    app = FastAPI(title="ctxpress", version=__version__,
                  description="Prompt compression (DAC) and KV-cache compression (SpindleKV) for LLM inference.")
    add_guards(app, max_request_bytes=max_request_bytes, max_queue=max_queue, api_key=api_key)
    add_error_handlers(app)
    compressor = PromptCompressor(lm, progress=False)
    policy = policy or PromptRequest()
    app.include_router(health.router(lm, upstream))
    app.include_router(compress.router(lm, compressor, request_timeout))
    if upstream is None:
        app.include_router(chat.router(chat.ChatService(lm, compressor, max_new_tokens, policy), request_timeout))
    else:
        forwarder = proxy.Forwarder(compressor, upstream, policy)
        app.include_router(proxy.router(forwarder))
        app.router.lifespan_context = forwarder.lifespan
    return app


__all__ = ["create_app"]
