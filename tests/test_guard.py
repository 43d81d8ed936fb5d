"""The API key and the bounded queue: the middleware alone, then on a real server."""

import asyncio

import httpx
import pytest

from ctxpress.guard import Admission, ApiKey

from conftest import running_server

openai = pytest.importorskip("openai")


class Gate:
    """An ASGI app whose model requests wait until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["path"] != "/healthz":
            self.entered += 1
            await self.open.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_queue_bound_answers_429_at_once_and_frees_places():
    async def scenario():
        gate = Gate()
        app = Admission(gate, max_queue=1, retry_after=3)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = asyncio.create_task(client.post("/v1/compress"))
            second = asyncio.create_task(client.post("/v1/chat/completions"))
            while gate.entered < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/compress")  # one served, one waiting: no room
            assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert (await client.get("/healthz")).status_code == 200  # only model paths are counted
            gate.open.set()
            assert [(await t).status_code for t in (first, second)] == [200, 200]
            assert app.active == 0
            assert (await client.post("/v1/compress")).status_code == 200  # places were freed

    asyncio.run(scenario())


def test_freed_memory_goes_back_when_the_last_request_leaves(monkeypatch):
    import platform
    import threading

    from ctxpress import guard
    from ctxpress.memory import release_freed

    assert release_freed() is (platform.libc_ver()[0] == "glibc")  # where there is malloc_trim, it was asked
    calls, done = [], threading.Event()
    monkeypatch.setattr(guard, "release_freed", lambda: (calls.append(1), done.set()))

    async def scenario():
        gate = Gate()
        app = Admission(gate, max_queue=2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            tasks = [asyncio.create_task(client.post("/v1/compress")) for _ in range(2)]
            while gate.entered < 2:
                await asyncio.sleep(0.01)
            assert not calls  # never while requests are in
            gate.open.set()
            await asyncio.gather(*tasks)
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 10)

    asyncio.run(scenario())
    assert calls == [1]  # once: when the second left, not when the first did


def test_api_key_middleware():
    async def scenario():
        gate = Gate()
        gate.open.set()
        app = ApiKey(gate, "s3cret")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Bearer s3cret "}):
                r = await client.post("/v1/compress", headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert "s3cret" not in r.text
            assert (await client.post("/v1/compress", headers={"Authorization": "Bearer s3cret"})).status_code == 200
            assert (await client.get("/healthz")).status_code == 200

    asyncio.run(scenario())
    with pytest.raises(ValueError):
        ApiKey(Gate(), "")
    with pytest.raises(ValueError):
        Admission(Gate(), -1)


@pytest.fixture(scope="module")
def guarded_url(tiny_lm):
    from ctxpress.server import create_app

    with running_server(create_app(tiny_lm, max_new_tokens=16, api_key="k-123", max_queue=2)) as url:
        yield url


def test_server_requires_the_key(guarded_url):
    messages = [{"role": "user", "content": "Say hi."}]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny", messages=messages, max_tokens=4)
    client = openai.OpenAI(base_url=f"{guarded_url}/v1", api_key="k-123", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{guarded_url}/healthz").status_code == 200
    r = httpx.post(f"{guarded_url}/v1/compress", json={"context": "a b c d", "rate": 0.5})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


FRAGMENT = """
import sys, torch
from ctxpress.memory import map_large_blocks, rss_bytes
if sys.argv[1] == "fixed":
    assert map_large_blocks()
x = torch.ones(16 * 2**20 // 4); del x  # glibc would now raise its threshold to 16 MiB
start = rss_bytes()
y = torch.ones(12 * 2**20 // 4); del y  # from the heap under the raised threshold, and kept there
print((rss_bytes() - start) // 2**20)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_large_tensors_go_back_to_the_system_when_freed():
    """After a large free glibc serves the next large tensors from its heap, where their memory stays;
    with a fixed threshold each has its own mapping, returned when it is freed."""
    import subprocess
    import sys

    def held(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.strip())

    assert held("dynamic") >= 8  # the 12 MiB stayed resident
    assert held("fixed") <= 2


def test_the_threshold_is_a_setting(monkeypatch):
    from ctxpress.errors import InputError
    from ctxpress.memory import THRESHOLD_ENV, map_large_blocks

    monkeypatch.setenv(THRESHOLD_ENV, "0")
    assert map_large_blocks() is False  # 0: glibc's own rule
    monkeypatch.setenv(THRESHOLD_ENV, "a lot")
    with pytest.raises(InputError, match="must be a number of bytes"):
        map_large_blocks()
