"""Answering questions about a long context with a compressed KV cache.

The context is prefilled once and compressed; each question is then answered
from a copy of that cache with ``model.generate`` (question-agnostic). With
``question_aware=True`` the question is part of the prefill, so the press's
observation window sees it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..chat import prompt_ids, question_ids
from ..compat import with_cache
from ..errors import InputError
from ..memory import PeakMemory
from ..models import LoadedModel
from ..words import token_words
from .cache import CompressedCache
from .contracts import Press
from .fanout import SharedPrefill
from .registry import FULL, build_press


@dataclass
class GenerationResult:
    """An answer and what producing it cost."""

    answer: str
    method: str
    cache_bytes: int  # stored after compressing the prompt
    full_cache_bytes: int  # a dense cache of the same prompt
    prefill_seconds: float  # prefill forward passes, compression excluded
    compress_seconds: float
    decode_tokens_per_second: float | None  # None when fewer than two tokens were generated: nothing to time
    peak_memory_bytes: int
    prompt_tokens: int
    generated_tokens: int
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Clock(BaseStreamer):
    """Timestamps of the tokens ``generate`` emits (the first call is the prompt),
    passed on to another streamer if one is given."""

    def __init__(self, then: BaseStreamer | None = None) -> None:
        self.times: list[float] = []
        self.then = then

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.then is not None:
            self.then.put(value)

    def end(self) -> None:
        if self.then is not None:
            self.then.end()

    def tokens_per_second(self) -> float | None:
        """Decoding speed between the first and the last generated token; None with fewer than two."""
        generated = self.times[1:]
        if len(generated) < 2:
            return None
        return (len(generated) - 1) / (generated[-1] - generated[0])


class CompressedContext:
    """A prompt prefix prefilled once into a cache compressed by ``press``.

    Each continuation is generated (or scored) from a copy of that cache, so
    one compression serves any number of questions.
    """

    def __init__(self, lm: LoadedModel, prefix_ids: torch.Tensor, press: Press) -> None:
        self.lm, self.press = lm, press
        self.prefix_ids = prefix_ids.to(lm.device)
        punctuation = press.needs_words()
        units = None if punctuation is None else token_words(lm.tokenizer, self.prefix_ids[0].tolist(), punctuation)
        self.cache = press.cache(lm.model, units)
        start = time.perf_counter()
        with torch.no_grad():
            out = lm.model(input_ids=self.prefix_ids, use_cache=True, logits_to_keep=1,
                           **with_cache(lm.model, self.cache))
        if self.prefix_ids.device.type == "cuda":
            torch.cuda.synchronize(self.prefix_ids.device)
        self.last_logits = out.logits[0, -1].float()  # predicts the first token after the prefix
        self.prefill_seconds = time.perf_counter() - start - self.cache.compress_seconds
        self._compressed(self.cache)

    def _compressed(self, cache: CompressedCache) -> None:
        self.cache, self.compress_seconds = cache, cache.compress_seconds
        self.cache_bytes, self.full_cache_bytes = cache.nbytes(), cache.dense_nbytes()

    @classmethod
    def sharing_prefill(cls, lm: LoadedModel, prefix_ids: torch.Tensor,
                        presses: Sequence[Press]) -> Iterator[CompressedContext]:
        """One context per press, in order, all from one prefill of ``prefix_ids``: each holds the cache
        its press builds from a prefill of its own (see :mod:`ctxpress.kv.fanout`), compressed when the
        iterator reaches it; ``prefill_seconds`` is the shared pass's. The presses must need the same
        from the prefill (:func:`~ctxpress.kv.fanout.prefill_needs`)."""
        shared = SharedPrefill(presses)
        prefilled = cls(lm, prefix_ids, shared)
        prefilled.cache = None  # dense, and its layers are the shared prefill that SharedPrefill lets go
        for i, press in enumerate(presses):
            context = copy.copy(prefilled)
            context.press = press
            context._compressed(shared.cache_for(i))
            yield context

    def generate(self, suffix_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0, *,
                 streamer: BaseStreamer | None = None, temperature: float | None = None,
                 top_p: float | None = None, stopping=None) -> tuple[torch.Tensor, float | None]:
        """Continuation of prefix + suffix: (new token ids, decoding tokens per second or None).

        Greedy unless ``temperature`` > 0; ``streamer`` also receives the tokens;
        ``stopping`` is a transformers ``StoppingCriteriaList``.
        """
        tok = self.lm.tokenizer
        full = torch.cat([self.prefix_ids, suffix_ids.to(self.lm.device)], dim=1)
        clock = _Clock(streamer)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature else {
            "do_sample": False, "temperature": None, "top_p": None}
        with torch.no_grad():
            out = self.lm.model.generate(
                full, **with_cache(self.lm.model, self.cache.copy()), max_new_tokens=max_new_tokens,
                min_new_tokens=min(min_new_tokens, max_new_tokens), top_k=None, streamer=clock,
                stopping_criteria=stopping, **sampling,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        return out[0, full.shape[1]:], clock.tokens_per_second()

    def next_token_logits(self, suffix_ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (len(suffix), vocab) float32 logits, row i predicting ``suffix[i]``."""
        with torch.no_grad():
            out = self.lm.model(input_ids=suffix_ids.to(self.lm.device), **with_cache(self.lm.model, self.cache.copy()))
        return torch.cat([self.last_logits[None], out.logits[0, :-1].float()])


def answer_questions(
    lm: LoadedModel,
    context: str,
    questions: Sequence[str],
    press: Press | str = FULL,
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
    tok = lm.tokenizer
    context_ids = prompt_ids(tok, context, "")[0]  # tokenized once, for every question
    asked_ids = [question_ids(tok, question) for question in questions]
    for asked in asked_ids:  # before any prefill: a request that cannot fit costs nothing
        total = context_ids.shape[1] + asked.shape[1]
        if total + max_new_tokens > lm.max_positions:
            raise InputError(f"context, question and answer need {total + max_new_tokens} tokens; "
                             f"the model handles {lm.max_positions}")
    results = []
    with lm.lock, PeakMemory(lm.device) as peak:
        shared = None if question_aware else CompressedContext(lm, context_ids, press)
        for asked in asked_ids:
            total = context_ids.shape[1] + asked.shape[1]
            if question_aware:  # the question's last token is left out of the prefill for generate to feed
                full = torch.cat([context_ids, asked], dim=1)
                ctx, suffix = CompressedContext(lm, full[:, :-1], press), full[:, -1:]
            else:
                ctx, suffix = shared, asked
            new, speed = ctx.generate(suffix, max_new_tokens, min_new_tokens)
            results.append(GenerationResult(
                answer=tok.decode(new, skip_special_tokens=True).strip(),
                method=press.name,
                cache_bytes=ctx.cache_bytes,
                full_cache_bytes=ctx.full_cache_bytes,
                prefill_seconds=ctx.prefill_seconds,
                compress_seconds=ctx.compress_seconds,
                decode_tokens_per_second=speed,
                peak_memory_bytes=0,
                prompt_tokens=total,
                generated_tokens=int(new.shape[0]),
                settings={**press.settings(), "question_aware": question_aware},
            ))
    for result in results:
        result.peak_memory_bytes = peak.bytes
    return results
