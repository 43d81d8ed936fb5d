"""A stand-in OpenAI-compatible upstream for the proxy benchmarks: what the proxy sends, without a provider.

Its own module, importing FastAPI at the top and without postponed annotations, so FastAPI can resolve
the route's ``Request`` parameter (and the other benchmarks need no serve extra).
"""

from fastapi import FastAPI, Request


def recording_upstream(seen: list[dict]) -> FastAPI:
    """An app that appends every chat body it receives to ``seen`` and answers one fixed word."""
    upstream = FastAPI()

    @upstream.post("/v1/chat/completions")
    async def record(request: Request) -> dict:
        seen.append(await request.json())
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "upstream",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "-"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}

    return upstream


__all__ = ["recording_upstream"]
