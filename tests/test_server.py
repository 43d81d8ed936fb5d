"""ctxpress serve: a real server on loopback, driven over HTTP and with the openai client."""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import TEXT, running_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def base_url(tiny_lm):
    from ctxpress.server import create_app

    with running_server(create_app(tiny_lm, max_request_bytes=64_000, max_new_tokens=64)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def test_health_and_docs(base_url):
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok", "model": "tiny-gqa", "pid": os.getpid()}
    assert httpx.get(f"{base_url}/docs").status_code == 200
    paths = httpx.get(f"{base_url}/openapi.json").json()["paths"]
    assert {"/v1/compress", "/v1/chat/completions", "/healthz"} <= set(paths)


def test_compress_endpoint(base_url, tiny_lm):
    from ctxpress.prompt import PromptCompressor

    body = {"context": TEXT, "target_tokens": 30, "method": "entropy", "question": "Why?"}
    got = httpx.post(f"{base_url}/v1/compress", json=body, timeout=60).json()
    want = PromptCompressor(tiny_lm, progress=False).compress(TEXT, target_tokens=30, method="entropy",
                                                             question="Why?").to_dict()
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}


def test_chat_with_openai_client(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXT + "\nWhat is dropped?"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert isinstance(plain.choices[0].message.content, str)
    assert plain.usage.completion_tokens <= 8
    assert plain.usage.prompt_tokens == plain.usage.model_extra["prompt_tokens_before_compression"]
    squeezed = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8,
        extra_body={"prompt_compression": {"rate": 0.5, "min_tokens": 20},
                    "kv_compression": {"method": "snapkv", "ratio": 0.5}})
    usage = squeezed.usage.model_extra
    assert squeezed.usage.prompt_tokens < usage["prompt_tokens_before_compression"]
    assert usage["kv_cache_bytes"] <= 0.5 * usage["kv_full_cache_bytes"]


def test_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Tell me about prompt compression."}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_concurrent_requests_are_queued_not_crashed(base_url):
    def chat(i: int) -> tuple[int, str]:
        body = {"messages": [{"role": "user", "content": f"Request {i}: {TEXT[:200]}"}], "max_tokens": 6}
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
        return r.status_code, r.json()["choices"][0]["message"]["content"]

    def compress(i: int) -> tuple[int, str]:
        r = httpx.post(f"{base_url}/v1/compress", json={"context": TEXT, "rate": 0.5}, timeout=120)
        return r.status_code, r.json()["compressed_text"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: chat(i) if i % 2 else compress(i), range(8)))
    assert all(status == 200 for status, _ in results)
    assert len({text for i, (_, text) in enumerate(results) if i % 2 == 0}) == 1  # same input, same answer
    assert [chat(i) for i in (1, 3)] == [results[1], results[3]]


@pytest.mark.parametrize(
    "path,content,status,needle",
    [
        ("/v1/compress", b"{not json", 400, "JSON"),
        ("/v1/compress", json.dumps({"rate": 0.5}).encode(), 400, "context"),
        ("/v1/compress", json.dumps({"context": TEXT, "rate": "half"}).encode(), 400, "rate"),
        ("/v1/compress", json.dumps({"context": TEXT, "rate": 2}).encode(), 400, "rate"),
        ("/v1/compress", json.dumps({"context": TEXT, "rate": 0.5, "method": "zip"}).encode(), 400, "unknown method"),
        ("/v1/compress", json.dumps({"context": "", "rate": 0.5}).encode(), 400, "empty"),
        ("/v1/compress", json.dumps({"context": TEXT, "rate": 0.5, "colour": 1}).encode(), 400, "colour"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "role"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
         400, "n"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": 5000}).encode(), 400, "limit"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "kv_compression": {"method": "lzw"}}).encode(), 400, "unknown KV"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                             "kv_compression": {"method": "full", "ratio": 0.5}}).encode(),
         400, "takes no budget"),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "kv_compression": {
            "method": "spindlekv", "ratio": 0.3, "options": {"per_head": "no"}}}).encode(), 400, "true or false"),
        ("/v1/compress", json.dumps({"context": "x" * 70_000, "rate": 0.5}).encode(), 413, "bytes"),
        ("/v1/nothing", b"{}", 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_errors(base_url, path, content, status, needle):
    r = httpx.post(f"{base_url}{path}", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status
    assert needle in r.json()["error"]["message"]
    assert httpx.get(f"{base_url}/healthz").status_code == 200  # the server lives on


SHORT_CHAT = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "path,body,needle",
    [
        ("/v1/compress", {"context": TEXT, "rate": 0.5, "options": {"bogus": 1}},
         "no option bogus (it takes: unit, line_breaks, stages, consecutive, unit_score, alpha, fusion, "
         "attention_from)"),
        ("/v1/compress", {"context": TEXT, "rate": 0.5, "options": {"question": "Why?"}}, "no option question"),
        ("/v1/compress", {"context": TEXT, "rate": 0.5, "options": {"stages": 1.5}}, "stages must be an integer"),
        ("/v1/compress", {"context": TEXT, "rate": 0.5, "options": {"consecutive": "maybe"}}, "true or false"),
        ("/v1/compress", {"context": TEXT, "rate": 0.5, "method": "llmlingua", "options": {"segment_tokens": 0}},
         "segment_tokens must be a positive integer"),
        ("/v1/chat/completions", {"messages": SHORT_CHAT, "prompt_compression": {"rate": 0.5, "options": {
            "rate": 0.1}}}, "no option rate"),
        ("/v1/chat/completions", {"messages": SHORT_CHAT, "prompt_compression": {"rate": 0.5, "options": {
            "alpha": 2}}}, "alpha must be in [0, 1]"),
    ],
)
def test_bad_prompt_method_options_are_400(base_url, path, body, needle):
    r = httpx.post(f"{base_url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_compress_endpoint_options(base_url, tiny_lm):
    from ctxpress.prompt import PromptCompressor

    body = {"context": TEXT, "rate": 0.5, "options": {"stages": 2, "consecutive": False}}
    got = httpx.post(f"{base_url}/v1/compress", json=body, timeout=60).json()
    want = PromptCompressor(tiny_lm, progress=False).compress(TEXT, rate=0.5, stages=2, consecutive=False)
    assert got["method"] == "dac-words" and got["settings"]["stages_run"] == 2
    assert got["kept_token_indices"] == want.kept_token_indices


def test_chunked_body_over_limit(base_url):
    def chunks():
        yield b'{"context": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'", "rate": 0.5}'

    r = httpx.post(f"{base_url}/v1/compress", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_codebook_only_kv_compression_needs_no_budget(base_url):
    body = {"messages": [{"role": "user", "content": TEXT}], "max_tokens": 2,
            "kv_compression": {"method": "spindlekv", "options": {"evict": False}}}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["kv_cache_bytes"] > 0


def test_time_limit_and_clients_that_leave(tiny_lm):
    """A request past its time limit gets 504 (a stream ends as "length"); one whose client left while it
    waited for the model frees its place in the queue and never runs."""
    import threading

    from ctxpress.server import create_app

    body = {"messages": [{"role": "user", "content": "Tell me about prompt compression."}], "max_tokens": 8}
    app = create_app(tiny_lm, request_timeout=0.5, max_queue=0)
    with running_server(app) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200
        release = threading.Event()

        def hold() -> None:  # the model is busy elsewhere for two seconds
            with tiny_lm.lock:
                release.wait(2)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert response.status_code == 504 and "time limit of 0.5 s" in response.json()["error"]["message"]
            response = httpx.post(f"{url}/v1/compress", json={"context": TEXT, "rate": 0.5}, timeout=30)
            assert response.status_code == 504
            with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True},
                              timeout=30) as streamed:
                assert streamed.status_code == 504  # refused before the stream starts: it waited too long
        finally:
            release.set()
            holder.join()

    app = create_app(tiny_lm, request_timeout=None, max_queue=0)
    with running_server(app) as url:
        release = threading.Event()
        holder = threading.Thread(target=lambda: tiny_lm.lock.acquire() and (release.wait(5), tiny_lm.lock.release()))
        holder.start()
        try:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up while the request waits
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
            time.sleep(0.6)  # the server notices within a quarter of a second
            with pytest.raises(httpx.ReadTimeout):  # its place is free: this one waits instead of a 429
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        finally:
            release.set()
            holder.join()
        time.sleep(0.6)
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200
