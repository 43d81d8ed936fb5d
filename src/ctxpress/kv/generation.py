"""Answering questions about a long context with a compressed KV cache.

The context is prefilled once and compressed; each question is then answered
from a copy of that cache with ``model.generate`` (question-agnostic). With
``question_aware=True`` the question is part of the prefill, so the press's
observation window sees it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..errors import InputError
from ..memory import PeakMemory
from ..models import LoadedModel
from . import build_press
from .presses import KVPress

SPLIT = "\n\n"  # between the context and the question inside the user message


@dataclass
class GenerationResult:
    """An answer and what producing it cost."""

    answer: str
    method: str
    cache_bytes: int  # stored after compressing the prompt
    full_cache_bytes: int  # a dense cache of the same prompt
    prefill_seconds: float  # prefill forward passes, compression excluded
    compress_seconds: float
    decode_tokens_per_second: float
    peak_memory_bytes: int
    prompt_tokens: int
    generated_tokens: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Clock(BaseStreamer):
    """Timestamps of the tokens ``generate`` emits (the first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tokens_per_second(self) -> float:
        generated = self.times[1:]
        if len(generated) < 2:
            return 0.0
        return (len(generated) - 1) / (generated[-1] - generated[0])


def prompt_ids(tokenizer, context: str, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the prompt split into (context part, question part).

    With a chat template, the user message is ``context + "\\n\\n" + question``
    and the split falls between the two; the first part is a prefix of the
    full chat prompt, so its cache can be reused for any question.
    """
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063CTXPRESS\u2063"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + marker + SPLIT + question}],
            tokenize=False, add_generation_prompt=True)
        head, tail = rendered.split(marker)
        first = tokenizer(head, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        tail = SPLIT + question + SPLIT + "Answer:"
        first = tokenizer(context, return_tensors="pt").input_ids
    second = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids
    return first, second


def answer_questions(
    lm: LoadedModel,
    context: str,
    questions: Sequence[str],
    press: KVPress | str = "full",
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    question_aware: bool = False,
    **press_options,
) -> list[GenerationResult]:
    """Answer each question from one compressed cache of ``context`` (greedy decoding).

    ``min_new_tokens`` suppresses end-of-sequence until that many tokens exist
    (for timing decoding over a fixed length).
    """
    if isinstance(press, str):
        press = build_press(press, **press_options)
    elif press_options:
        raise InputError("press options go with a press name, not a configured press")
    if not context.strip():
        raise InputError("context is empty")
    if not questions or any(not isinstance(q, str) or not q.strip() for q in questions):
        raise InputError("give at least one non-empty question")
    if question_aware and len(questions) > 1:
        raise InputError("a question-aware cache serves one question; compress once per question")
    if max_new_tokens < 1:
        raise InputError("max_new_tokens must be at least 1")
    model, tok = lm.model, lm.tokenizer
    device = lm.device
    context_ids, _ = prompt_ids(tok, context, questions[0])
    limit = lm.max_positions
    results = []
    with lm.lock, torch.no_grad(), PeakMemory(device) as peak:
        cache = press.cache(model)
        shared = None
        if not question_aware:
            shared = _prefill(model, cache, context_ids.to(device))
        for question in questions:
            _, question_ids = prompt_ids(tok, context, question)
            full = torch.cat([context_ids, question_ids], dim=1).to(device)
            if full.shape[1] + max_new_tokens > limit:
                raise InputError(f"context, question and answer need {full.shape[1] + max_new_tokens} tokens; "
                                 f"the model handles {limit}")
            if question_aware:
                shared = _prefill(model, cache, full[:, :-1])
                use = cache
            else:
                use = cache.copy()
            clock = _Clock()
            out = model.generate(full, past_key_values=use, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min(min_new_tokens, max_new_tokens), do_sample=False,
                                 top_p=None, top_k=None, temperature=None, streamer=clock,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            new = out[0, full.shape[1]:]
            results.append(GenerationResult(
                answer=tok.decode(new, skip_special_tokens=True).strip(),
                method=press.name,
                cache_bytes=shared["cache_bytes"],
                full_cache_bytes=shared["full_cache_bytes"],
                prefill_seconds=shared["prefill_seconds"],
                compress_seconds=shared["compress_seconds"],
                decode_tokens_per_second=clock.tokens_per_second(),
                peak_memory_bytes=0,
                prompt_tokens=int(full.shape[1]),
                generated_tokens=int(new.shape[0]),
                settings={**press.settings(), "question_aware": question_aware},
            ))
    for result in results:
        result.peak_memory_bytes = peak.bytes
    return results


def _prefill(model, cache, ids: torch.Tensor) -> dict:
    """Run the prefill that compresses ``cache``; report its cost and the cache size."""
    start = time.perf_counter()
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    elapsed = time.perf_counter() - start
    return {
        "prefill_seconds": elapsed - cache.compress_seconds,
        "compress_seconds": cache.compress_seconds,
        "cache_bytes": cache.nbytes(),
        "full_cache_bytes": cache.dense_nbytes(),
    }
