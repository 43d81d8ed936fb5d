"""``GET /metrics``: what the server did, in Prometheus' text format.

* ``ctxpress_requests_total{route, status}``: every answered request, the
  refused ones (401, 413, 429) included; ``route`` is one of the app's paths,
  or ``other`` for the rest, so a scan of random paths cannot grow the series.
* ``ctxpress_prompt_tokens_before_total`` / ``_after_total``,
  ``ctxpress_messages_compressed_total``,
  ``ctxpress_compressed_message_cache_hits_total``: every compression's
  :class:`~ctxpress.messages.Tally`, summed: proxied requests, a local chat's
  ``prompt_compression`` and ``/v1/compress`` (one context, one message).
* ``ctxpress_compression_seconds``: seconds each of those requests spent
  being compressed (a histogram).
* ``ctxpress_upstream_seconds``: seconds from sending a request upstream to
  the upstream's answer (for a stream, its response headers: the wait before
  the first token).

Each application has a registry of its own, so several apps in one process
(tests, benchmarks) never add to each other's counts. The route is guarded
by ``--api-key`` like every other path but ``/healthz``: Prometheus sends the
key with ``authorization: {credentials: KEY}`` in its scrape config.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from ..messages import Tally

# Seconds: compression of one request (a few ms on a cache hit, seconds for long RAG prompts on a CPU) and an
# upstream's answer (a short chat to a long generation).
COMPRESSION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OTHER_ROUTE = "other"


class Metrics:
    """One application's counters and histograms, on a registry of its own."""

    def __init__(self) -> None:
        self.paths: set[str] = set()  # the app's routes: the values of the requests' route label
        self.registry = CollectorRegistry()
        on = {"registry": self.registry}
        self.requests = Counter("ctxpress_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], **on)
        self.tokens_before = Counter("ctxpress_prompt_tokens_before",
                                     "Prompt tokens before compression (compressor's tokenizer)",
                                     **on)
        self.tokens_after = Counter("ctxpress_prompt_tokens_after",
                                    "Prompt tokens after compression (compressor's tokenizer)",
                                    **on)
        self.compressed = Counter("ctxpress_messages_compressed", "Messages (or prompts) compressed", **on)
        self.cache_hits = Counter("ctxpress_compressed_message_cache_hits",
                                  "Messages answered from the compressed-message cache", **on)
        self.compression_seconds = Histogram("ctxpress_compression_seconds",
                                             "Seconds one request spent being compressed",
                                             buckets=COMPRESSION_BUCKETS, **on)
        self.upstream_seconds = Histogram("ctxpress_upstream_seconds",
                                          "Seconds from sending a request upstream to its answer (a stream: its "
                                          "response headers)", buckets=UPSTREAM_BUCKETS, **on)

    def known(self, routes: Iterable[object]) -> None:
        """Paths that are counted under their own name (:func:`.app.create_app` names every router's)."""
        self.paths.update(path for route in routes if isinstance(path := getattr(route, "path", None), str))

    def compression(self, tally: Tally) -> None:
        """One request's compression, counted once it is done (for the proxy: before the request goes upstream)."""
        self.tokens_before.inc(tally.before)
        self.tokens_after.inc(tally.after)
        self.compressed.inc(tally.compressed)
        self.cache_hits.inc(tally.cache_hits)
        self.compression_seconds.observe(tally.seconds)

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class CountRequests:
    """ASGI middleware: every HTTP request counted by route and status once its answer has been sent.

    Added last (outermost), so the answers of the key check, the queue bound
    and the body limit are counted too. A request that ends without an answer
    (the app raised) counts as 500, which is what the client gets.
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def sent(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope["path"] if scope["path"] in self.metrics.paths else OTHER_ROUTE
            self.metrics.requests.labels(route, str(status)).inc()


def router(metrics: Metrics) -> APIRouter:
    routes = APIRouter()

    @routes.get("/metrics", include_in_schema=False)
    def exposition() -> Response:
        return metrics.exposition()

    return routes


__all__ = ["CountRequests", "Metrics", "router"]
