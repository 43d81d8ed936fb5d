"""``POST /v1/chat/completions`` and ``GET /v1/models`` on the local model, in OpenAI's format.

A request's ``prompt_compression`` compresses its long messages first, under
the same message policy as the proxy (:mod:`ctxpress.messages`); its
``kv_compression`` picks a KV press for this generation. ``usage`` reports
the prompt tokens before and after compression and the KV cache's bytes.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from transformers import StoppingCriteriaList, TextIteratorStreamer

from ..chat import chat_ids
from ..errors import InputError
from ..kv import FULL, CompressedContext, Press, press_with_budget
from ..messages import Shrinker, Tally
from ..models import LoadedModel
from ..prompt import PromptCompressor
from ..request import PromptRequest
from .deadline import Deadline, StopAtDeadline, watched
from .metrics import Metrics
from .schemas import ChatBody


@dataclass
class ChatPlan:
    """A chat request made ready for the model: its (compressed) prompt, press and token limit."""

    ids: torch.Tensor  # (1, n) prompt token ids, after prompt compression
    tokens_before: int  # prompt tokens before prompt compression
    press: Press
    limit: int  # new tokens at most


@dataclass
class Reply:
    """What every chunk or answer of one reply repeats."""

    ident: str
    created: int
    model: str

    def chunk(self, delta: dict, finish: str | None = None) -> str:
        payload = {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                   "model": self.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class ChatService:
    """Answers chat requests with one loaded model; requests take turns on its lock."""

    def __init__(self, lm: LoadedModel, compressor: PromptCompressor, max_new_tokens: int,
                 policy: PromptRequest | None = None, metrics: Metrics | None = None) -> None:
        self.lm, self.tokenizer, self.max_new_tokens = lm, lm.tokenizer, max_new_tokens
        self.shrinker = Shrinker(compressor)
        self.policy = policy or PromptRequest()  # what a request's prompt_compression fields override
        self.metrics = metrics or Metrics()

    def checked(self, body: ChatBody) -> tuple[PromptRequest | None, Press]:
        """The request's prompt policy (None: no prompt compression) and press, checked before it waits."""
        policy = None if body.prompt_compression is None else self.policy.overridden(body.prompt_compression)
        kv = body.kv_compression
        press = press_with_budget(kv.method, kv.ratio, kv.tokens, kv.options) if kv else press_with_budget(FULL)
        return policy, press

    def plan(self, body: ChatBody, policy: PromptRequest | None, press: Press) -> ChatPlan:
        """Compress long messages, tokenize the chat and fix the token limit (model lock held)."""
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        before = chat_ids(self.tokenizer, _for_template(messages))
        if policy is not None:
            tally = Tally()
            messages = self.shrinker.messages(messages, policy, tally)
            self.metrics.compression(tally)
        ids = chat_ids(self.tokenizer, _for_template(messages)) if policy is not None else before
        limit = body.max_completion_tokens or body.max_tokens or min(256, self.max_new_tokens)
        if limit > self.max_new_tokens:
            raise InputError(f"max_tokens {limit} is over this server's limit of {self.max_new_tokens}")
        if ids.shape[1] + limit > self.lm.max_positions:
            raise InputError(f"prompt ({ids.shape[1]} tokens) plus max_tokens ({limit}) exceed the model's "
                             f"{self.lm.max_positions}-token window")
        return ChatPlan(ids, int(before.shape[1]), press, limit)

    def planned(self, body: ChatBody, policy: PromptRequest | None, press: Press,
                deadline: Deadline) -> ChatPlan:
        with deadline.holding(self.lm.lock):  # prompt compression runs on the model too
            return self.plan(body, policy, press)

    def answer(self, body: ChatBody, plan: ChatPlan, deadline: Deadline,
               streamer=None) -> tuple[CompressedContext, torch.Tensor]:
        """Prefill all but the prompt's last token into the planned cache, then generate (model lock held)."""
        with deadline.holding(self.lm.lock):
            ctx = CompressedContext(self.lm, plan.ids[:, :-1], plan.press)
            new, _ = ctx.generate(plan.ids[:, -1:], plan.limit, temperature=body.temperature, top_p=body.top_p,
                                  streamer=streamer, stopping=StoppingCriteriaList([StopAtDeadline(deadline)]))
        return ctx, new

    def usage(self, plan: ChatPlan, ctx: CompressedContext, completion: int) -> dict:
        prompt = int(plan.ids.shape[1])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_before_compression": int(plan.tokens_before),
                "kv_cache_bytes": ctx.cache_bytes, "kv_full_cache_bytes": ctx.full_cache_bytes}

    def finish(self, new: torch.Tensor, limit: int) -> str:
        ended = len(new) > 0 and int(new[-1]) == self.tokenizer.eos_token_id
        return "length" if len(new) >= limit and not ended else "stop"

    def respond(self, body: ChatBody, plan: ChatPlan, deadline: Deadline, reply: Reply) -> dict:
        ctx, new = self.answer(body, plan, deadline)
        deadline.check()  # an answer cut by the time limit is an error, not a short answer
        return {
            "id": reply.ident, "object": "chat.completion", "created": reply.created, "model": reply.model,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": self.tokenizer.decode(new, skip_special_tokens=True)},
                         "finish_reason": self.finish(new, plan.limit)}],
            "usage": self.usage(plan, ctx, len(new)),
        }

    def stream(self, body: ChatBody, plan: ChatPlan, deadline: Deadline, reply: Reply) -> Iterator[str]:
        """Server-sent events: the answer as it is generated on a worker thread, then usage if asked."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["ctx"], outcome["new"] = self.answer(body, plan, deadline, streamer=streamer)
            except Exception as exc:  # reported to the client as a final error event
                outcome["error"] = exc
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield reply.chunk({"role": "assistant", "content": ""})
            for text in streamer:
                if text:
                    yield reply.chunk({"content": text})
            worker.join()
            if "error" in outcome:
                yield f"data: {json.dumps({'error': {'message': str(outcome['error']), 'type': 'server_error'}})}\n\n"
            else:
                new = outcome["new"]  # cut by the time limit: the stream still ends cleanly, as "length"
                yield reply.chunk({}, "length" if deadline.expired() else self.finish(new, plan.limit))
                if (body.stream_options or {}).get("include_usage"):
                    payload = {"id": reply.ident, "object": "chat.completion.chunk", "created": reply.created,
                               "model": reply.model, "choices": [],
                               "usage": self.usage(plan, outcome["ctx"], len(new))}
                    yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            deadline.gone.set()  # a client that left stops the generation at the next token


def _for_template(messages: list[dict]) -> list[dict]:
    """Messages as chat templates know them: ``developer`` is OpenAI's newer name for ``system``."""
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def router(service: ChatService, request_timeout: float | None) -> APIRouter:
    """The routes: requests are checked at once, then wait for the model with their deadline running."""
    routes = APIRouter()

    @routes.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": service.lm.name, "object": "model", "owned_by": "ctxpress"}]}

    @routes.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        deadline = Deadline(request_timeout)
        policy, press = service.checked(body)
        plan = await watched(request, deadline, service.planned, body, policy, press, deadline)
        reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model or service.lm.name)
        if body.stream:
            return StreamingResponse(service.stream(body, plan, deadline, reply), media_type="text/event-stream")
        return await watched(request, deadline, service.respond, body, plan, deadline, reply)

    return routes


__all__ = ["ChatPlan", "ChatService", "router"]
