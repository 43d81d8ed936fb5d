"""Anthropic's Messages API through the proxy: the anthropic client -> ctxpress serve --upstream -> a stand-in."""

import asyncio
import json
import socket

import anthropic
import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ctxpress.anthropic_messages import AnthropicWalker
from ctxpress.cli import build_parser
from ctxpress.cli.serve import _forwarding
from ctxpress.errors import InputError
from ctxpress.messages import Tally
from ctxpress.proxy import Upstream, default_key_env
from ctxpress.request import PromptRequest
from ctxpress.server import create_app

from conftest import running_server

KEY = "sk-ant-upstream-secret"
PROXY_KEY = "proxy-secret"
LONG = " ".join(f"Sentence {i} says the small local model reads every word before the answer." for i in range(12))
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def upstream_app(seen: list) -> FastAPI:
    """An Anthropic-shaped stand-in: records body and headers; the model name picks its behaviour."""
    app = FastAPI()

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        seen.append({"body": None, "headers": dict(request.headers)})
        return {"data": [{"type": "model", "id": "claude-test", "display_name": "Claude Test",
                          "created_at": "2025-01-01T00:00:00Z"}],
                "has_more": False, "first_id": "claude-test", "last_id": "claude-test"}

    @app.post("/v1/messages")
    async def messages(request: Request):
        body = await request.json()
        seen.append({"body": body, "headers": dict(request.headers)})
        if body["model"] == "refuse":
            return JSONResponse({"type": "error", "error": {"type": "invalid_request_error",
                                                            "message": "max_tokens: too large"}}, status_code=400)
        if body["model"] == "slow":
            await asyncio.sleep(3)
        text = f"echo {len(json.dumps(body['messages']))}"
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {"input_tokens": 11, "output_tokens": 2}}
        if not body.get("stream"):
            return message

        def events():
            start = {**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 11, "output_tokens": 1}}
            sequence = [("message_start", {"message": start}),
                        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                        ("ping", {})]
            sequence += [("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
                         for piece in ("echo", " ", text.split()[1])]
            sequence += [("content_block_stop", {"index": 0}),
                         ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                            "usage": {"output_tokens": 2}}),
                         ("message_stop", {})]
            for name, data in sequence:
                yield f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"
                if body["model"] == "break":
                    raise RuntimeError("the upstream fell over mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def upstream():
    seen: list = []
    with running_server(upstream_app(seen)) as url:
        yield url + "/v1", seen


@pytest.fixture(scope="module")
def proxy(tiny_lm, upstream):
    url, _ = upstream
    app = create_app(tiny_lm, upstream=Upstream(url, KEY, timeout=1.5), api_key=PROXY_KEY,
                     policy=PromptRequest(rate=0.5, min_tokens=20))
    with running_server(app) as proxy_url:
        yield proxy_url


@pytest.fixture
def client(proxy):
    return anthropic.Anthropic(base_url=proxy, api_key=PROXY_KEY, max_retries=0)


def _words(text: str) -> set[str]:
    return {w.rstrip(".") for w in text.split()}


def test_a_long_message_is_compressed_and_the_upstream_gets_its_own_key(client, upstream):
    _, seen = upstream
    reply = client.messages.create(model="claude-test", max_tokens=64, stop_sequences=["###"], system=LONG,
                                   messages=[{"role": "user", "content": LONG + "\n\nWhich word?"}],
                                   extra_headers={"anthropic-version": "2023-06-01", "anthropic-beta": "beta-1"})
    sent, headers = seen[-1]["body"], seen[-1]["headers"]
    assert sent["model"] == "claude-test" and sent["max_tokens"] == 64 and sent["stop_sequences"] == ["###"]
    user = sent["messages"][0]["content"]
    assert user.endswith("\n\nWhich word?") and len(user) < 0.8 * len(LONG)  # the question kept whole
    assert _words(user) <= _words(LONG + " Which word?")
    assert len(sent["system"]) < 0.8 * len(LONG)
    assert headers["x-api-key"] == KEY and "authorization" not in headers  # the upstream's key, as Anthropic's
    assert PROXY_KEY not in json.dumps(headers)  # the proxy's own key stays here
    assert headers["anthropic-version"] == "2023-06-01" and headers["anthropic-beta"] == "beta-1"  # as sent
    assert reply.content[0].text == f"echo {len(json.dumps(sent['messages']))}"
    assert reply.usage.input_tokens == 11  # the upstream's own usage
    mine = reply.usage.model_dump()["ctxpress"]
    assert mine["messages_compressed"] == 2 and mine["prompt_tokens_after"] < 0.8 * mine["prompt_tokens_before"]


def test_blocks_tools_images_and_cache_control_keep_their_places(client, upstream):
    _, seen = upstream
    cached = {"type": "ephemeral"}
    system = [{"type": "text", "text": "Answer from the tools."},
              {"type": "text", "text": LONG, "cache_control": cached}]
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "search",
                "input": {"query": "who won " + "the race " * 40, "limit": 5, "nested": {"a": [1, 2]}}}
    messages = [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "text", "text": LONG, "cache_control": cached},
            {"type": "text", "text": LONG + "\n\nWhich word?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Searching."}, tool_use]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": LONG, "cache_control": cached},
            {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False,
             "content": [{"type": "text", "text": LONG}]}]},
    ]
    client.messages.create(model="claude-test", max_tokens=16, system=system, messages=messages,
                           tools=[{"name": "search", "description": "web", "input_schema": {"type": "object"}}])
    sent = seen[-1]["body"]
    assert sent["tools"][0]["name"] == "search"
    assert sent["system"][0] == system[0]  # short: as it came
    assert sent["system"][1]["cache_control"] == cached and len(sent["system"][1]["text"]) < 0.8 * len(LONG)
    first = sent["messages"][0]["content"]
    assert first[0] == messages[0]["content"][0]  # the image, byte for byte
    assert first[1]["cache_control"] == cached and len(first[1]["text"]) < 0.8 * len(LONG)
    assert "cache_control" not in first[2] and first[2]["text"].endswith("\n\nWhich word?")
    assert sent["messages"][1]["content"] == messages[1]["content"]  # assistant: not a compressed role
    result, listed = sent["messages"][2]["content"]
    assert result["tool_use_id"] == "toolu_1" and result["cache_control"] == cached
    assert isinstance(result["content"], str) and len(result["content"]) < 0.8 * len(LONG)
    assert listed["is_error"] is False and listed["content"][0]["type"] == "text"
    assert len(listed["content"][0]["text"]) < 0.8 * len(LONG)
    # every key of every block kept, in order
    assert [list(m) for m in sent["messages"]] == [list(m) for m in messages]
    for got, given in zip(sent["messages"], messages):
        assert [list(b) for b in got["content"]] == [list(b) for b in given["content"]]


def test_streaming_is_relayed_with_usage_in_start_and_delta(client, upstream):
    _, seen = upstream
    with client.messages.stream(model="claude-test", max_tokens=16,
                                messages=[{"role": "user", "content": LONG + "\n\nWhich word?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    sent = seen[-1]["body"]
    assert sent["stream"] is True and len(sent["messages"][0]["content"]) < 0.8 * len(LONG)
    assert text == f"echo {len(json.dumps(sent['messages']))}"
    usage = final.usage.model_dump()
    assert usage["output_tokens"] == 2 and usage["ctxpress"]["messages_compressed"] == 1
    events = list(client.messages.create(model="claude-test", max_tokens=16, stream=True,
                                         messages=[{"role": "user", "content": LONG}]))
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    start, delta = events[0], next(e for e in events if e.type == "message_delta")
    assert start.message.usage.model_dump()["ctxpress"] == delta.usage.model_dump()["ctxpress"]
    assert delta.usage.model_dump()["ctxpress"]["prompt_tokens_before"] > 0


def test_models_are_asked_as_anthropics_api(client, upstream):
    _, seen = upstream
    assert [model.id for model in client.models.list()] == ["claude-test"]
    assert seen[-1]["headers"]["x-api-key"] == KEY and "authorization" not in seen[-1]["headers"]


def test_a_stream_that_breaks_off_ends_with_an_error_event(client):
    with pytest.raises(anthropic.APIStatusError, match="the upstream stream broke off"):  # as Anthropic's own
        list(client.messages.create(model="break", max_tokens=8, stream=True,
                                    messages=[{"role": "user", "content": "hi"}]))


def test_the_proxy_key_is_checked_as_x_api_key(proxy, upstream):
    _, seen = upstream
    before = len(seen)
    wrong = anthropic.Anthropic(base_url=proxy, api_key="not-the-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        wrong.messages.create(model="claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401 and len(seen) == before
    # the same key opens the OpenAI routes too, either way it is sent
    for headers in ({"x-api-key": PROXY_KEY}, {"Authorization": f"Bearer {PROXY_KEY}"}):
        assert httpx.get(proxy + "/metrics", headers=headers).status_code == 200
    assert httpx.get(proxy + "/metrics", headers={"x-api-key": "nope"}).status_code == 401


def test_upstream_errors_and_bad_requests(client, tiny_lm, upstream):
    _, seen = upstream
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: too large") as caught:
        client.messages.create(model="refuse", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # the upstream's body as it was
    with pytest.raises(anthropic.APIStatusError, match=r"did not answer within 1\.5 s") as caught:
        client.messages.create(model="slow", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 504
    before = len(seen)
    for body, match in (({"model": "m", "max_tokens": 8, "messages": []}, "non-empty list"),
                        ({"model": "m", "max_tokens": 8, "system": 5, "messages": [{"role": "user", "content": "x"}]},
                         "system must be"),
                        ({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": LONG}],
                          "prompt_compression": {"rate": 3}}, "rate must be in")):
        with pytest.raises(anthropic.BadRequestError, match=match):
            client.post("/v1/messages", body=body, cast_to=httpx.Response)
    assert len(seen) == before
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    app = create_app(tiny_lm, upstream=Upstream(f"http://127.0.0.1:{closed}/v1", KEY))
    with running_server(app) as url:
        response = httpx.post(url + "/v1/messages", headers={"anthropic-version": "2023-06-01"},
                              json={"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502 and "cannot be reached" in response.json()["error"]["message"]
        assert KEY not in response.text


def test_per_request_policy_turns_compression_off(client, upstream):
    _, seen = upstream
    client.messages.create(model="claude-test", max_tokens=8, messages=[{"role": "user", "content": LONG}],
                           extra_body={"prompt_compression": {"rate": 1}})
    assert seen[-1]["body"]["messages"][0]["content"] == LONG and "prompt_compression" not in seen[-1]["body"]


def test_the_walker_asks_the_shrinker_what_the_policy_says():
    """Which texts reach Shrinker.text, with which role, question and tool flags (no model needed)."""
    calls = []

    class Recorder:
        def text(self, text, policy, tally, eligible, question=False, tool=False):
            calls.append((text, eligible, question, tool))
            return text.upper()

    body = {"system": [{"type": "text", "text": "s"}], "metadata": {"user_id": "u"}, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                     {"type": "document", "source": {"type": "text", "data": "d"}}]},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]},
        {"role": "user", "content": "q"}]}
    out = AnthropicWalker(Recorder(), PromptRequest(roles=("user", "tool")), Tally()).request(body)
    assert calls == [("s", False, False, False), ("a", True, False, False), ("b", True, True, False),
                     ("c", False, False, False), ("r", True, False, True), ("q", True, True, False)]
    assert out["messages"][0]["content"][2] == body["messages"][0]["content"][2]  # the document as it came
    assert out["metadata"] == body["metadata"] and out["messages"][3]["content"] == "Q"
    assert body["messages"][3]["content"] == "q"  # the request itself is left as it was
    with pytest.raises(InputError, match="system must be"):
        AnthropicWalker(Recorder(), PromptRequest(), Tally()).request({"system": {}, "messages": [body["messages"][3]]})


def test_the_upstream_key_is_read_from_the_providers_variable(monkeypatch):
    assert default_key_env("https://api.anthropic.com/v1") == "ANTHROPIC_API_KEY"
    assert default_key_env("https://api.openai.com/v1") == "OPENAI_API_KEY"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-oai")
    monkeypatch.setenv("MY_KEY", "sk-mine")

    def key(*flags: str) -> str | None:
        return _forwarding(build_parser().parse_args(["serve", *flags]))["upstream"].key

    assert key("--upstream", "https://api.anthropic.com/v1") == "sk-ant"  # never the OpenAI key
    assert key("--upstream", "http://127.0.0.1:8001/v1") == "sk-oai"
    assert key("--upstream", "https://api.anthropic.com/v1", "--upstream-key-env", "MY_KEY") == "sk-mine"
    upstream = Upstream("http://h:1/v1", key="k")
    assert upstream.headers("x-api-key") == {"x-api-key": "k"} and upstream.headers() == {"Authorization": "Bearer k"}
    with pytest.raises(ValueError, match="scheme"):
        upstream.headers("basic")
