"""``ctxpress serve --upstream URL``: compress long messages, then forward to any OpenAI-compatible API.

The people who pay per token send their prompts to a hosted or self-hosted
LLM, not to the compressor's small model. In front of it, ctxpress
compresses what is long and passes everything else through untouched:

* ``POST /v1/chat/completions``: messages of the compressed roles (system,
  user and tool by default) longer than ``min_tokens`` are compressed; the
  request, the model name and every field ctxpress does not know go
  upstream as they came. The answer, streamed or not, comes back as the
  upstream sent it, with ``usage.ctxpress`` added (the prompt's tokens
  before and after compression, counted by the compressor's tokenizer)
  and the same counts in ``x-ctxpress-*`` headers.
* ``POST /v1/completions``: the same for a string ``prompt``.
* ``GET /v1/models``: the upstream's list.

Text between ``<ctxpress:keep>`` and ``</ctxpress:keep>`` is never
compressed; the tags are removed. The last paragraph of the last user
message (after its last blank line) is taken for the question and kept
whole when it is at most ``min_tokens`` long. A request's ``prompt_compression`` field
overrides the server's :class:`Policy` for that request (``{"rate": 1}`` or
``{"roles": []}`` turns it off). Upstream errors come back with the
upstream's status and body; an upstream that does not answer in time is a
504, one that cannot be reached a 502, both JSON errors. The upstream key
is read from an environment variable whose *name* is configured, and is
never logged or echoed.
"""

import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import InputError
from .prompt import PromptCompressor
from .prompt.methods import DEFAULT_METHOD, build_method

if TYPE_CHECKING:  # the serve extra's packages are imported when the proxy is installed, not by the CLI
    import httpx
    from fastapi import FastAPI

KEEP = re.compile(r"<ctxpress:keep>(.*?)</ctxpress:keep>", re.DOTALL)
ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_ROLES = ("system", "developer", "user", "tool")
DEFAULT_TIMEOUT = 600.0  # seconds for the upstream's whole answer (a long generation included)
MIN_SEGMENT_TOKENS = 16  # free text shorter than this between kept spans is left as it is


@dataclass(frozen=True)
class Policy:
    """What the proxy compresses and how much.

    ``rate`` (fraction of a message's tokens kept) or ``target_tokens``
    (tokens a compressed message keeps); ``method`` and its ``options``;
    ``roles``: whose messages are compressed; ``min_tokens``: shorter
    messages (a short question) are sent as they are.
    """

    rate: float | None = 0.5
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    options: Mapping[str, Any] = field(default_factory=dict)
    roles: tuple[str, ...] = DEFAULT_ROLES
    min_tokens: int = 256

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.target_tokens is None):
            raise InputError("prompt_compression: give rate or target_tokens (exactly one)")
        if self.rate is not None and not 0 < self.rate <= 1:
            raise InputError(f"prompt_compression: rate must be in (0, 1], got {self.rate!r}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise InputError(f"prompt_compression: target_tokens must be >= 1, got {self.target_tokens!r}")
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown:
            raise InputError(f"prompt_compression: unknown role {unknown[0]!r} (choose from: {', '.join(ROLES)})")
        if self.min_tokens < 0:
            raise InputError(f"prompt_compression: min_tokens must be >= 0, got {self.min_tokens!r}")
        build_method(self.method, **self.options)  # a bad method or option fails here, before any work

    def overridden(self, override: object) -> "Policy":
        """This policy with a request's ``prompt_compression`` fields applied."""
        if override is None:
            return self
        if not isinstance(override, dict):
            raise InputError("prompt_compression must be an object")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(override) - known)
        if unknown:
            raise InputError(f"prompt_compression: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        changes = dict(override)
        if "rate" in changes and "target_tokens" not in changes:
            changes["target_tokens"] = None  # a request's rate replaces the server's token target
        if "target_tokens" in changes and "rate" not in changes:
            changes["rate"] = None
        if "roles" in changes:
            if not isinstance(changes["roles"], list) or not all(isinstance(r, str) for r in changes["roles"]):
                raise InputError("prompt_compression: roles must be a list of role names")
            changes["roles"] = tuple(changes["roles"])
        for name, kind in (("rate", (int, float)), ("target_tokens", int), ("min_tokens", int),
                           ("method", str), ("options", dict)):
            value = changes.get(name)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise InputError(f"prompt_compression: {name} has the wrong type ({type(value).__name__})")
        return replace(self, **changes)


@dataclass
class Upstream:
    """The OpenAI-compatible server behind the proxy.

    ``url`` is the API's base URL as the ``openai`` client takes it
    (``https://api.example.com/v1``); ``key_env`` names the environment
    variable holding its key (unset or empty: no ``Authorization`` header).
    """

    url: str
    key: str | None = field(default=None, repr=False)  # never printed
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.url or ""):
            raise InputError(f"--upstream must be an http(s) URL such as http://127.0.0.1:8001/v1, got {self.url!r}")
        self.url = self.url.rstrip("/")
        if self.timeout <= 0:
            raise InputError(f"the upstream timeout must be positive, got {self.timeout!r}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


@dataclass
class Tally:
    """Prompt tokens (compressor's tokenizer) before and after compression, for one request."""

    before: int = 0
    after: int = 0
    compressed: int = 0  # messages (or prompts) compressed
    seconds: float = 0.0

    def usage(self) -> dict:
        return {"prompt_tokens_before": self.before, "prompt_tokens_after": self.after,
                "messages_compressed": self.compressed, "compression_seconds": round(self.seconds, 4)}

    def headers(self) -> dict[str, str]:
        return {"x-ctxpress-prompt-tokens-before": str(self.before),
                "x-ctxpress-prompt-tokens-after": str(self.after)}


class Shrinker:
    """Applies a :class:`Policy` to message texts with one :class:`PromptCompressor`."""

    def __init__(self, compressor: PromptCompressor) -> None:
        self.compressor = compressor

    def text(self, text: str, policy: Policy, tally: Tally, eligible: bool, question: bool = False) -> str:
        """``text`` with its free parts compressed (if ``eligible`` and long enough) and keep tags removed.

        ``question``: the text ends with the question (the last user message):
        its last paragraph is kept whole when it is at most ``min_tokens`` long.
        """
        pieces = _split_kept(text)
        if question:
            pieces = self._question_kept(pieces, policy.min_tokens)
        plain = "".join(piece for piece, _ in pieces)
        count = self.compressor.count_tokens
        tokens = count(plain)
        tally.before += tokens
        if not eligible or tokens <= policy.min_tokens or policy.rate == 1:
            tally.after += tokens
            return plain
        free = [(piece, count(piece)) for piece, kept in pieces if not kept]
        free_tokens = sum(n for _, n in free)
        rate = policy.rate if policy.rate is not None else min(1.0, policy.target_tokens / max(1, free_tokens))
        start = time.perf_counter()
        method = build_method(policy.method, **policy.options)
        out = []
        for piece, kept in pieces:
            size = count(piece)
            if kept or size < MIN_SEGMENT_TOKENS or rate >= 1:
                out.append(piece)
                continue
            result = self.compressor.compress(piece, target_tokens=max(1, round(rate * size)), method=method)
            out.append(_with_edges(piece, result.compressed_text))
        tally.seconds += time.perf_counter() - start
        tally.compressed += 1
        joined = "".join(out)
        tally.after += count(joined)
        return joined

    def _question_kept(self, pieces: list[tuple[str, bool]], limit: int) -> list[tuple[str, bool]]:
        """The last paragraph of the last free piece marked kept, if it is at most ``limit`` tokens."""
        if not pieces or pieces[-1][1]:
            return pieces
        last = pieces[-1][0]
        cut = last.rstrip().rfind("\n\n")
        if cut < 0 or self.compressor.count_tokens(last[cut:]) > limit:
            return pieces
        return [*pieces[:-1], (last[:cut], False), (last[cut:], True)]

    def messages(self, messages: object, policy: Policy, tally: Tally) -> list:
        """Chat messages with the policy applied; anything that is not text passes through.

        The last user message's final paragraph is taken for the question and kept whole.
        """
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list")
        if not all(isinstance(message, dict) for message in messages):
            raise InputError("every message must be an object with a role")
        users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
        out = []
        for i, message in enumerate(messages):
            eligible, asks = message.get("role") in policy.roles, bool(users) and i == users[-1]
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": self.text(content, policy, tally, eligible, asks)}
            elif isinstance(content, list):
                texts = [j for j, part in enumerate(content) if isinstance(part, dict)
                         and part.get("type") == "text" and isinstance(part.get("text"), str)]
                parts = list(content)
                for j in texts:
                    parts[j] = {**parts[j], "text": self.text(parts[j]["text"], policy, tally, eligible,
                                                              asks and j == texts[-1])}
                message = {**message, "content": parts}
            out.append(message)
        return out


def _split_kept(text: str) -> list[tuple[str, bool]]:
    """``text`` as (piece, kept) pairs, the keep tags removed."""
    pieces, at = [], 0
    for match in KEEP.finditer(text):
        if match.start() > at:
            pieces.append((text[at : match.start()], False))
        pieces.append((match.group(1), True))
        at = match.end()
    if at < len(text):
        pieces.append((text[at:], False))
    return pieces


def _with_edges(original: str, compressed: str) -> str:
    """Compressed text with the original's leading and trailing whitespace, so pieces never glue."""
    core = compressed.strip()
    lead = original[: len(original) - len(original.lstrip())]
    trail = original[len(original.rstrip()) :]
    return f"{lead}{core}{trail}"


def _error(status: int, message: str, kind: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


PASSED_HEADERS = ("content-type", "x-request-id", "openai-processing-ms", "retry-after")


def install(app: "FastAPI", compressor: PromptCompressor, upstream: Upstream, policy: Policy) -> None:
    """Add the proxy's routes to ``app`` (the server's middleware, body limit and key still apply)."""
    import httpx
    from fastapi import Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    shrinker = Shrinker(compressor)
    timeout = httpx.Timeout(upstream.timeout, connect=min(10.0, upstream.timeout))
    pool: dict[str, httpx.AsyncClient] = {}  # one client (connection pool) while the app runs

    @asynccontextmanager
    async def lifespan(_app):
        async with httpx.AsyncClient(timeout=timeout) as shared:
            pool["client"] = shared
            yield
        pool.clear()

    app.router.lifespan_context = lifespan

    def client() -> httpx.AsyncClient:
        if "client" not in pool:  # an app driven without its lifespan (some test clients)
            pool["client"] = httpx.AsyncClient(timeout=timeout)
        return pool["client"]

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        if "kv_compression" in body:
            raise InputError("kv_compression applies to the local model; this server forwards to an upstream API")
        return body

    def passed(response: httpx.Response, tally: Tally) -> dict[str, str]:
        kept = {k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS}
        return {**kept, **tally.headers()}

    async def forward(path: str, body: dict, tally: Tally) -> Response:
        url = f"{upstream.url}/{path}"
        try:
            if body.get("stream"):
                request = client().build_request("POST", url, json=body, headers=upstream.headers())
                response = await client().send(request, stream=True)
                if response.status_code >= 400:
                    content = await response.aread()
                    await response.aclose()
                    return Response(content, response.status_code, passed(response, tally))
                return StreamingResponse(_relay(response, tally), response.status_code, passed(response, tally),
                                         media_type=response.headers.get("content-type", "text/event-stream"))
            response = await client().post(url, json=body, headers=upstream.headers())
        except httpx.TimeoutException:
            return _error(504, f"the upstream did not answer within {upstream.timeout:g} s", "upstream_timeout")
        except httpx.HTTPError as exc:
            return _error(502, f"the upstream at {upstream.url} cannot be reached ({type(exc).__name__})",
                          "upstream_unreachable")
        if response.status_code >= 400:
            return Response(response.content, response.status_code, passed(response, tally))
        try:
            answer = response.json()
        except ValueError:
            return Response(response.content, response.status_code, passed(response, tally))
        if isinstance(answer, dict):
            answer.setdefault("usage", {})
            if isinstance(answer["usage"], dict):
                answer["usage"]["ctxpress"] = tally.usage()
        return JSONResponse(answer, response.status_code, passed(response, tally))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await body_of(request)
        chosen = policy.overridden(body.pop("prompt_compression", None))
        tally = Tally()
        body["messages"] = await run_in_threadpool(shrinker.messages, body.get("messages"), chosen, tally)
        return await forward("chat/completions", body, tally)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await body_of(request)
        chosen = policy.overridden(body.pop("prompt_compression", None))
        tally = Tally()
        if not isinstance(body.get("prompt"), str):
            raise InputError("prompt must be a string (lists of prompts or token ids are not compressed)")
        body["prompt"] = await run_in_threadpool(shrinker.text, body["prompt"], chosen, tally, "user" in chosen.roles)
        return await forward("completions", body, tally)

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            response = await client().get(f"{upstream.url}/models", headers=upstream.headers())
        except httpx.TimeoutException:
            return _error(504, f"the upstream did not answer within {upstream.timeout:g} s", "upstream_timeout")
        except httpx.HTTPError as exc:
            return _error(502, f"the upstream at {upstream.url} cannot be reached ({type(exc).__name__})",
                          "upstream_unreachable")
        return Response(response.content, response.status_code, passed(response, Tally()))


async def _relay(response: "httpx.Response", tally: Tally) -> AsyncIterator[bytes]:
    """The upstream's event stream line by line, ``usage.ctxpress`` added to the chunk that carries usage.

    The upstream response is closed when the stream ends or the client leaves.
    """
    import httpx

    try:
        async for line in response.aiter_lines():
            if line.startswith("data:") and '"usage"' in line:
                line = _with_usage(line, tally)
            yield (line + "\n").encode()
    except httpx.HTTPError as exc:
        error = {"error": {"message": f"the upstream stream broke off ({type(exc).__name__})",
                           "type": "upstream_unreachable"}}
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        await response.aclose()


def _with_usage(line: str, tally: Tally) -> str:
    try:
        payload = json.loads(line[len("data:") :])
    except json.JSONDecodeError:
        return line
    if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
        payload["usage"]["ctxpress"] = tally.usage()
        return "data: " + json.dumps(payload, ensure_ascii=False)
    return line


def parse_roles(text: str) -> tuple[str, ...]:
    """``--compress-roles`` (comma-separated role names, may be empty) as a tuple."""
    return tuple(r.strip() for r in text.split(",") if r.strip())


__all__ = ["DEFAULT_ROLES", "Policy", "Shrinker", "Tally", "Upstream", "install", "parse_roles"]
