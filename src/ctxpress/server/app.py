"""The application: one loaded model, the guards, and one router per surface."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from .. import __version__
from ..guard import DEFAULT_MAX_QUEUE
from ..models import LoadedModel
from ..prompt import PromptCompressor
from ..proxy import Upstream
from ..request import PromptRequest
from . import anthropic, chat, compress, health, metrics, proxy
from .guards import add_error_handlers, add_guards
from .settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_REQUEST_TIMEOUT


def create_app(lm: LoadedModel, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, api_key: str | None = None,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               max_queue: int | None = DEFAULT_MAX_QUEUE, upstream: Upstream | None = None,
               policy: PromptRequest | None = None) -> FastAPI:
    """The HTTP application around one loaded model.

    ``api_key``: required as ``Authorization: Bearer`` or ``x-api-key`` (None: open).
    ``max_queue``: requests that may wait behind the one served (None: no bound).
    ``request_timeout``: seconds from arrival, queueing included, before a
    request is answered 504 (a stream ends with ``finish_reason`` ``length``);
    None: no limit.
    ``upstream``: forward chat, completions (:mod:`ctxpress.server.proxy`)
    and Anthropic's messages (:mod:`ctxpress.server.anthropic`) there after
    compressing long messages under ``policy``, instead of answering with
    the local model. ``policy`` is also what a local chat request's
    ``prompt_compression`` fields override.

    ``GET /metrics`` counts what this app did (:mod:`ctxpress.server.metrics`).
    """
    app = FastAPI(title="ctxpress", version=__version__,
                  description="Prompt compression (DAC) and KV-cache compression (SpindleKV) for LLM inference.")
    add_guards(app, max_request_bytes=max_request_bytes, max_queue=max_queue, api_key=api_key)
    counts = metrics.Metrics()
    app.add_middleware(metrics.CountRequests, metrics=counts)  # outermost: refused requests are counted too
    add_error_handlers(app)
    compressor = PromptCompressor(lm, progress=False)
    policy = policy or PromptRequest()

    def include(routes: APIRouter) -> None:
        app.include_router(routes)
        counts.known(routes.routes)

    include(health.router(lm, upstream))
    include(metrics.router(counts))
    include(compress.router(lm, compressor, request_timeout, counts))
    if upstream is None:
        include(chat.router(chat.ChatService(lm, compressor, max_new_tokens, policy, counts), request_timeout))
    else:
        forwarder = proxy.Forwarder(compressor, upstream, policy, counts)
        include(proxy.router(forwarder))
        include(anthropic.router(forwarder))
        app.router.lifespan_context = forwarder.lifespan
    counts.known(app.routes)  # the documentation's own (/docs, /openapi.json)
    return app


__all__ = ["create_app"]
