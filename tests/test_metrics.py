"""``GET /metrics``: after known traffic, the Prometheus exposition parses and counts exactly that traffic."""

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client.parser import text_string_to_metric_families

from ctxpress.proxy import Upstream
from ctxpress.request import PromptRequest
from ctxpress.server import create_app

from conftest import running_server

KEY = "metrics-key"
LONG = " ".join(f"Sentence {i} says the small local model reads every word before the answer." for i in range(12))


def upstream_app() -> FastAPI:
    """Both APIs in their smallest form: enough for the proxy to forward to."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        await request.json()
        return {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "usage": {"prompt_tokens": 1},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}

    @app.post("/v1/messages")
    async def messages(request: Request) -> dict:
        await request.json()
        return {"id": "msg", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
                "content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 1, "output_tokens": 1}}

    return app


def samples(text: str) -> dict[tuple, float]:
    """Every sample of the exposition as {(name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def proxy(tiny_lm):
    with running_server(upstream_app()) as upstream:
        app = create_app(tiny_lm, upstream=Upstream(upstream + "/v1"), api_key=KEY,
                         policy=PromptRequest(rate=0.5, min_tokens=20))
        with running_server(app) as url:
            yield url


def test_metrics_count_what_the_proxy_did(proxy):
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "m", "messages": [{"role": "user", "content": LONG + "\n\nWhich word?"}]}
    usages = []
    for _ in range(2):  # the second time, the message comes from the cache
        usages.append(httpx.post(proxy + "/v1/chat/completions", json=chat, headers=auth).json()["usage"]["ctxpress"])
    usages.append(httpx.post(proxy + "/v1/messages", headers={"x-api-key": KEY}, json={
        "model": "m", "max_tokens": 8, "system": LONG, "messages": [{"role": "user", "content": "hi"}]}
    ).json()["usage"]["ctxpress"])
    assert httpx.post(proxy + "/v1/chat/completions", json=chat).status_code == 401
    assert httpx.post(proxy + "/v1/messages", json={"messages": []}, headers=auth).status_code == 400
    assert httpx.get(proxy + "/no/such/path", headers=auth).status_code == 404
    assert httpx.get(proxy + "/healthz").status_code == 200
    assert httpx.get(proxy + "/metrics").status_code == 401  # guarded like every path but /healthz

    response = httpx.get(proxy + "/metrics", headers=auth)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)

    def requests(route: str, status: int) -> float:
        return got.get(("ctxpress_requests_total", (("route", route), ("status", str(status)))), 0)

    assert requests("/v1/chat/completions", 200) == 2 and requests("/v1/chat/completions", 401) == 1
    assert requests("/v1/messages", 200) == 1 and requests("/v1/messages", 400) == 1
    assert requests("other", 404) == 1 and requests("/healthz", 200) == 1 and requests("/metrics", 401) == 1
    assert got[("ctxpress_prompt_tokens_before_total", ())] == sum(u["prompt_tokens_before"] for u in usages)
    assert got[("ctxpress_prompt_tokens_after_total", ())] == sum(u["prompt_tokens_after"] for u in usages)
    assert got[("ctxpress_messages_compressed_total", ())] == sum(u["messages_compressed"] for u in usages) == 3
    hits = sum(u["cache_hits"] for u in usages)
    assert got[("ctxpress_compressed_message_cache_hits_total", ())] == hits and hits >= 1
    # one observation per forwarded request; the refused ones never reached compression or the upstream
    assert got[("ctxpress_compression_seconds_count", ())] == 3
    assert got[("ctxpress_compression_seconds_sum", ())] == pytest.approx(
        sum(u["compression_seconds"] for u in usages), abs=1e-3)
    assert got[("ctxpress_upstream_seconds_count", ())] == 3 and got[("ctxpress_upstream_seconds_sum", ())] > 0


def test_the_local_server_has_metrics_of_its_own(tiny_lm):
    """A second app in the same process starts from zero: each app has its own registry."""
    app = create_app(tiny_lm)
    with running_server(app) as url:
        assert httpx.post(url + "/v1/compress", json={"context": LONG, "rate": 0.5}).status_code == 200
        got = samples(httpx.get(url + "/metrics").text)
    assert got[("ctxpress_requests_total", (("route", "/v1/compress"), ("status", "200")))] == 1
    assert got[("ctxpress_upstream_seconds_count", ())] == 0
    assert not any(name == "ctxpress_requests_total" and dict(labels)["route"] == "/v1/chat/completions"
                   for name, labels in got)


def test_metrics_count_the_local_servers_compression(tiny_lm):
    """Without an upstream, a chat's prompt_compression and /v1/compress are counted as the proxy's requests are."""
    app = create_app(tiny_lm, policy=PromptRequest(rate=0.5, min_tokens=20))
    with running_server(app) as url:
        chat = httpx.post(url + "/v1/chat/completions", json={
            "model": "m", "max_tokens": 2, "prompt_compression": {"rate": 0.5, "min_tokens": 20},
            "messages": [{"role": "user", "content": LONG + "\n\nWhich word?"}]}).json()
        compressed = httpx.post(url + "/v1/compress", json={"context": LONG, "rate": 0.5}).json()
        counts = samples(httpx.get(url + "/metrics").text)
    assert chat["usage"]["prompt_tokens"] < chat["usage"]["prompt_tokens_before_compression"]
    assert counts[("ctxpress_messages_compressed_total", ())] == 2
    assert counts[("ctxpress_prompt_tokens_after_total", ())] < counts[("ctxpress_prompt_tokens_before_total", ())]
    assert counts[("ctxpress_prompt_tokens_before_total", ())] > compressed["origin_tokens"]
    assert counts[("ctxpress_compression_seconds_count", ())] == 2
    assert counts[("ctxpress_upstream_seconds_count", ())] == 0
    assert counts[("ctxpress_requests_total", (("route", "/v1/compress"), ("status", "200")))] == 1
