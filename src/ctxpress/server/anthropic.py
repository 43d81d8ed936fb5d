"""Anthropic's Messages API through the proxy: ``POST /v1/messages`` to ``{upstream}/messages``.

The request's ``system`` and ``messages`` are compressed under the server's
policy, overridden by its ``prompt_compression`` field
(:mod:`ctxpress.anthropic_messages`); everything else goes upstream as it
came. The upstream's key is sent as ``x-api-key``, with the client's
``anthropic-version`` and ``anthropic-beta`` headers. The answer comes back
as the upstream sent it, with ``usage.ctxpress`` added: in the JSON body,
or, streamed, in ``message_start``'s ``message.usage`` (what the
``anthropic`` client's final message keeps) and ``message_delta``'s
``usage``; the ``x-ctxpress-*`` headers as on OpenAI's routes. A stream that
breaks off ends with an ``error`` event, as Anthropic's own streams do.

One :class:`~.proxy.Forwarder` (connection pool, policy, errors) serves this
route and OpenAI's; ``GET /v1/models`` is OpenAI's route, which asks the
upstream as Anthropic's API when the client sends ``anthropic-version``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..anthropic_messages import AnthropicWalker
from ..messages import Tally
from .proxy import ANTHROPIC, Forwarder


def router(forwarder: Forwarder) -> APIRouter:
    """The route; it shares the forwarder (and so the app's lifespan) with :func:`.proxy.router`."""
    routes = APIRouter()

    @routes.post("/v1/messages")
    async def messages(request: Request) -> Response:
        body, policy = await forwarder.body_of(request)
        tally = Tally()
        walker = AnthropicWalker(forwarder.shrinker, policy, tally)
        body = await run_in_threadpool(walker.request, body)
        return await forwarder.forward("messages", body, tally, ANTHROPIC, request.headers)

    return routes


__all__ = ["router"]
