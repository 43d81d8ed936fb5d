"""The compressing proxy over real HTTP: the openai client -> ctxpress serve --upstream -> a second server."""

import asyncio
import itertools
import json
import socket

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ctxpress.cli import main
from ctxpress.errors import InputError
from ctxpress.proxy import Upstream
from ctxpress.request import PromptRequest
from ctxpress.server import create_app

from conftest import running_server

KEY = "sk-upstream-secret"
LONG = " ".join(f"Sentence {i} says the small local model reads every word before the answer." for i in range(12))


def upstream_app(seen: list) -> FastAPI:
    """An OpenAI-compatible stand-in that records what it receives; the model name picks its behaviour."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "upstream-model", "object": "model", "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        if body["model"] == "fail":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if body["model"] == "slow":
            await asyncio.sleep(3)
        text = f"echo {len(json.dumps(body['messages']))}"
        usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        if not body.get("stream"):
            return {"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}], "usage": usage}

        def events():
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
            for piece in ("echo", " ", text.split()[1]):
                delta = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                yield f"data: {json.dumps({**base, 'choices': [delta]})}\n\n"
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        return {"id": "p1", "object": "text_completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}

    return app


@pytest.fixture(scope="module")
def upstream():
    seen: list = []
    with running_server(upstream_app(seen)) as url:
        yield url + "/v1", seen


@pytest.fixture(scope="module")
def proxy(tiny_lm, upstream):
    url, _ = upstream
    app = create_app(tiny_lm, upstream=Upstream(url, KEY, timeout=1.5), policy=PromptRequest(rate=0.5, min_tokens=20))
    with running_server(app) as proxy_url:
        yield proxy_url


@pytest.fixture
def client(proxy):
    return openai.OpenAI(base_url=proxy + "/v1", api_key="client-key-unused", max_retries=0)


def test_long_messages_are_compressed_and_the_rest_passes_through(client, upstream):
    _, seen = upstream
    reply = client.chat.completions.create(
        model="upstream-model", temperature=0.3, user="someone",
        messages=[{"role": "system", "content": LONG}, {"role": "user", "content": "Which word?"}])
    sent = seen[-1]["body"]
    assert sent["model"] == "upstream-model" and sent["temperature"] == 0.3 and sent["user"] == "someone"
    assert sent["messages"][1] == {"role": "user", "content": "Which word?"}  # short: untouched
    system = sent["messages"][0]["content"]
    assert len(system) < 0.8 * len(LONG) and "  " not in system
    # whole words of the original (a full stop may follow a kept word), never glued
    assert {w.rstrip(".") for w in system.split()} <= {w.rstrip(".") for w in LONG.split()}
    assert seen[-1]["authorization"] == f"Bearer {KEY}"
    assert reply.choices[0].message.content == f"echo {len(json.dumps(sent['messages']))}"
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] == 7  # the upstream's own usage
    mine = usage["ctxpress"]
    assert mine["messages_compressed"] == 1 and mine["prompt_tokens_after"] < 0.75 * mine["prompt_tokens_before"]


def test_streaming_is_relayed_with_usage(client, upstream):
    _, seen = upstream
    stream = client.chat.completions.create(
        model="upstream-model", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": LONG + "\n\nWhich word?"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"echo {len(json.dumps(seen[-1]['body']['messages']))}"
    usage = chunks[-1].usage.model_dump()
    assert usage["total_tokens"] == 9 and usage["ctxpress"]["messages_compressed"] == 1
    sent = seen[-1]["body"]["messages"][0]["content"]
    assert sent.endswith("\n\nWhich word?") and len(sent) < 0.8 * len(LONG)  # the question kept whole


def test_kept_spans_and_per_request_policy(client, upstream):
    _, seen = upstream
    kept = "Keep this exact sentence, 48151623, verbatim."
    client.chat.completions.create(model="upstream-model", messages=[
        {"role": "user", "content": f"{LONG} <ctxpress:keep>{kept}</ctxpress:keep> {LONG}"}])
    sent = seen[-1]["body"]["messages"][0]["content"]
    assert kept in sent and "ctxpress:keep" not in sent and len(sent) < 0.8 * (2 * len(LONG) + len(kept))
    for override in ({"rate": 1}, {"roles": ["assistant"]}, {"min_tokens": 10_000}):
        client.chat.completions.create(model="upstream-model", messages=[{"role": "user", "content": LONG}],
                                       extra_body={"prompt_compression": override})
        assert seen[-1]["body"]["messages"][0]["content"] == LONG
        assert "prompt_compression" not in seen[-1]["body"]
    client.chat.completions.create(model="upstream-model", messages=[{"role": "user", "content": LONG}],
                                   extra_body={"prompt_compression": {"target_tokens": 30}})
    assert len(seen[-1]["body"]["messages"][0]["content"]) < 0.5 * len(LONG)


@pytest.mark.parametrize("override, match", [
    ({"rate": 3}, "rate must be in"),
    ({"ratio": 0.5}, "unknown field 'ratio'"),
    ({"roles": ["narrator"]}, "unknown role 'narrator'"),
    ({"method": "zip"}, "zip"),
    ({"rate": "half"}, "wrong type"),
])
def test_bad_requests_are_400_before_anything_is_sent(client, upstream, override, match):
    _, seen = upstream
    before = len(seen)
    with pytest.raises(openai.BadRequestError, match=match) as caught:
        client.chat.completions.create(model="upstream-model", messages=[{"role": "user", "content": LONG}],
                                       extra_body={"prompt_compression": override})
    assert caught.value.status_code == 400 and len(seen) == before


def test_upstream_failures_become_clear_statuses(client, proxy, tiny_lm):
    with pytest.raises(openai.InternalServerError, match="boom") as caught:  # passed through with its body
        client.chat.completions.create(model="fail", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 500
    with pytest.raises(openai.APIStatusError, match=r"did not answer within 1\.5 s") as caught:
        client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 504
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    app = create_app(tiny_lm, upstream=Upstream(f"http://127.0.0.1:{closed}/v1", KEY))
    with running_server(app) as url:
        response = httpx.post(url + "/v1/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502 and "cannot be reached" in response.json()["error"]["message"]
        assert KEY not in response.text
        response = httpx.get(url + "/v1/models")
        assert response.status_code == 502


def test_models_completions_and_the_local_endpoints(client, proxy, upstream):
    _, seen = upstream
    assert [m.id for m in client.models.list()] == ["upstream-model"]
    reply = httpx.post(proxy + "/v1/completions", json={"model": "upstream-model", "prompt": LONG}).json()
    assert reply["usage"]["ctxpress"]["messages_compressed"] == 1
    assert len(seen[-1]["body"]["prompt"]) < 0.8 * len(LONG)
    assert httpx.get(proxy + "/healthz").json()["upstream"].endswith("/v1")
    local = httpx.post(proxy + "/v1/compress", json={"context": LONG, "rate": 0.5}).json()
    assert local["compressed_tokens"] < local["origin_tokens"]
    for body, match in (({"model": "m", "messages": []}, "non-empty list"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "kv_compression": {}},
                         "local model")):
        response = httpx.post(proxy + "/v1/chat/completions", json=body)
        assert response.status_code == 400 and match in response.json()["error"]["message"]
    response = httpx.post(proxy + "/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400


def test_policy_and_upstream_are_checked_when_made():
    with pytest.raises(InputError, match="exactly one"):
        PromptRequest(rate=None)
    with pytest.raises(InputError, match="http"):
        Upstream("localhost:8000")
    assert Upstream("http://h:1/v1/").url == "http://h:1/v1"
    assert Upstream("http://h:1/v1", key="").headers() == {}
    assert "sk-x" not in repr(Upstream("http://h:1/v1", key="sk-x"))


def test_serve_refuses_proxy_options_without_an_upstream(capsys):
    assert main(["serve", "--rate", "0.3"]) == 2
    assert "--upstream" in capsys.readouterr().err
    assert main(["serve", "--upstream", "ftp://somewhere"]) == 2
    assert main(["serve", "--upstream", "http://h/v1", "--compress-roles", "user,narrator"]) == 2
    assert "unknown role 'narrator'" in capsys.readouterr().err


def test_an_agents_conversation_keeps_json_code_and_a_stable_history(client, upstream):
    """Five turns resent whole, as agents do: JSON stays valid, code arrives whole, history is a stable prefix."""
    _, seen = upstream
    records = [{"title": f"Doc {i}", "text": LONG, "score": i / 10, "cited": i == 2} for i in range(3)]
    arguments = json.dumps({"query": "which word", "limit": 3})
    code = "```python\ndef words(text: str) -> list[str]:\n    return [w for w in text.split() if w]\n```"
    new = [
        [{"role": "system", "content": LONG}, {"role": "user", "content": f"{LONG}\n\nWhich word?"}],
        [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": arguments}}]},
         {"role": "tool", "tool_call_id": "c1", "content": json.dumps(records)}],
        [{"role": "assistant", "content": "The first."},
         {"role": "user", "content": f"{code}\n{LONG}\n\nIs it right?"}],
        [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": f"{LONG}\n\nAnd now?"}],
        [{"role": "assistant", "content": "Still."}, {"role": "user", "content": "Thanks!"}],
    ]
    history, sent, hits = [], [], []
    for messages in new:
        history = history + messages
        reply = client.chat.completions.create(model="upstream-model", messages=history,
                                               extra_body={"prompt_compression": {"json": "values"}})
        sent.append(seen[-1]["body"]["messages"])
        hits.append(reply.usage.model_extra["ctxpress"]["cache_hits"])
    for turn, following in itertools.pairwise(sent):
        assert json.dumps(following[: len(turn)]) == json.dumps(turn)  # byte-identical prefix
    final = sent[-1]
    assert final[2]["tool_calls"][0]["function"]["arguments"] == arguments
    results = json.loads(final[3]["content"])
    assert [sorted(r) for r in results] == [sorted(r) for r in records] and results[2]["cited"] is True
    assert len(results[0]["text"]) < len(LONG)  # long string values shortened
    assert code in final[5]["content"] and len(final[5]["content"]) < len(new[2][1]["content"])
    assert hits == [0, 2, 3, 4, 5]  # every message an earlier turn compressed comes from the cache
