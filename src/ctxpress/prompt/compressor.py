"""The prompt compression API: :class:`PromptCompressor`."""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

import torch

from ..errors import InputError
from ..models import DEFAULT_MODEL, LoadedModel, load_model
from .job import Job
from .methods import DEFAULT_METHOD, Method, build_method
from .result import CompressionResult
from .selection import resolve_target
from .tokens import bos_prefix, decode, encode_plain, tokenize_context

SEPARATOR = "\n\n"  # between instruction, documents, context and question

Context = str | Sequence[str]


def _context_text(context: Context) -> str:
    if isinstance(context, str):
        text = context
    elif isinstance(context, Sequence) and all(isinstance(doc, str) for doc in context):
        text = SEPARATOR.join(doc for doc in context if doc.strip())
    else:
        raise InputError("context must be a string or a list of strings")
    if not text.strip():
        raise InputError("context is empty")
    return text


class PromptCompressor:
    """Compress prompts with a small local causal LM (``dac-words`` by default).

    >>> pc = PromptCompressor()            # the embedded SmolLM2-135M
    >>> r = pc.compress(text, rate=0.5)    # or target_tokens=...
    >>> r.compressed_prompt, r.compressed_tokens

    ``window_tokens`` caps how many tokens the compressor reads at once
    (default: the model's context length); longer contexts are scored in
    windows under one global budget. ``batch_tokens`` bounds a forward batch.
    ``progress``: True/False forces the stderr progress bar on/off; None shows
    it for long work on a terminal.
    """

    def __init__(
        self,
        model: str | LoadedModel = DEFAULT_MODEL,
        *,
        device: str | None = None,
        dtype: str | None = None,
        window_tokens: int | None = None,
        batch_tokens: int = 4096,
        progress: bool | None = None,
    ) -> None:
        self.lm = model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
        if window_tokens is not None and window_tokens < 32:
            raise InputError(f"window_tokens must be at least 32, got {window_tokens}")
        self.window_tokens = min(window_tokens or self.lm.max_positions, self.lm.max_positions)
        self.batch_tokens = batch_tokens
        self.progress = progress

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(encode_plain(self.tokenizer, text))

    def compress(
        self,
        context: Context,
        *,
        rate: float | None = None,
        target_tokens: int | None = None,
        method: str | Method = DEFAULT_METHOD,
        instruction: str = "",
        question: str = "",
        force_tokens: Sequence[str] = (),
        **options,
    ) -> CompressionResult:
        """Compress one context (a string, or a list of documents joined by blank lines).

        Exactly one of ``rate`` (fraction of context tokens kept, in (0, 1]) or
        ``target_tokens`` is required; the result keeps exactly that many
        context tokens (a few fewer, never more, only when the units left are
        all bigger than the rest of the quota: see :mod:`.selection`).
        ``instruction`` and ``question`` are kept whole and
        surround the context in ``compressed_prompt``; ``force_tokens`` (literal
        strings or ``[:newline:]``, ``[:digit:]``, ``[:punct:]``) are never
        dropped. ``options`` override the method's defaults (its fields, see ``METHODS``).
        """
        return self.compress_batch(
            [context], rate=rate, target_tokens=target_tokens, method=method,
            instruction=instruction, question=question, force_tokens=force_tokens, **options,
        )[0]

    def compress_batch(
        self,
        contexts: Sequence[Context],
        *,
        rate: float | None = None,
        target_tokens: int | None = None,
        method: str | Method = DEFAULT_METHOD,
        instruction: str = "",
        question: str = "",
        force_tokens: Sequence[str] = (),
        **options,
    ) -> list[CompressionResult]:
        """Compress several contexts together: their forward passes are batched.

        ``method`` is a name from ``METHODS`` or a configured method object
        (e.g. ``DACMethod(stages=4)``). ``seconds`` of each result is the time
        of the whole batch.
        """
        if isinstance(contexts, str):
            raise InputError("compress_batch takes a list of contexts; use compress for one")
        start = time.perf_counter()
        if isinstance(method, str):
            algorithm = build_method(method, **options)
        elif not isinstance(method, Method):
            raise InputError(f"method must be a name from METHODS or a Method object, got {type(method).__name__}")
        elif options:
            raise InputError("options go with a method name, not with a configured method")
        else:
            algorithm = method
        method_name = algorithm.name
        for name, value in (("instruction", instruction), ("question", question)):
            if not isinstance(value, str):
                raise InputError(f"{name} must be a string")
        if isinstance(force_tokens, str):
            force_tokens = [force_tokens]
        tok = self.tokenizer
        prefix = torch.cat([bos_prefix(tok), encode_plain(tok, instruction + SEPARATOR if instruction else "")])
        suffix = encode_plain(tok, SEPARATOR + question if question else "")
        jobs = []
        for context in contexts:
            ctx = tokenize_context(tok, _context_text(context), force_tokens, algorithm.unit, algorithm.line_breaks)
            target = resolve_target(len(ctx), rate, target_tokens)
            jobs.append(algorithm.make_job(tok, context, ctx, prefix, suffix, target, self.window_tokens))
        with self.lm.lock:
            algorithm.run(self.lm.model, [j for j in jobs if j.target < len(j.context)],
                          batch_tokens=self.batch_tokens, progress=self.progress)
        seconds = time.perf_counter() - start
        settings = {**algorithm.settings(), "window_tokens": self.window_tokens, "model": self.lm.name}
        return [self._result(job, instruction, question, method_name, settings, seconds) for job in jobs]

    def _result(self, job: Job, instruction: str, question: str, method: str, settings: dict,
                seconds: float) -> CompressionResult:
        kept = job.kept_indices()
        text = decode(self.tokenizer, job.context.ids[kept])
        prompt = SEPARATOR.join(part for part in (instruction, text, question) if part)
        job_settings = {**settings, "stages_run": job.stages, "rule_relaxed_stages": job.relaxed_stages}
        return CompressionResult(
            compressed_text=text,
            compressed_prompt=prompt,
            kept_token_indices=kept.tolist(),
            origin_tokens=len(job.context),
            compressed_tokens=len(kept),
            seconds=seconds,
            method=method,
            settings=job_settings,
        )

    def compress_documents(
        self,
        documents: Sequence[str],
        *,
        rate: float | None = None,
        target_tokens: int | None = None,
        method: str | Method = DEFAULT_METHOD,
        question: str = "",
        force_tokens: Sequence[str] = (),
        **options,
    ) -> list[str]:
        """Several documents under one budget, each given back on its own, in order.

        The method ranks the words of all documents together (one global
        budget, as retrieved passages need: a passage full of what matters
        keeps more of itself than one of filler). Budget and options as in
        :meth:`compress`, counted over the documents joined by blank lines
        (which the default method keeps, so each costs a token or two of the
        budget, and which are not part of the texts returned); a document
        whose every token was dropped comes back as "".
        """
        if isinstance(documents, str) or not all(isinstance(doc, str) for doc in documents):
            raise InputError("documents must be a list of strings")
        if not documents:
            return []
        joined = SEPARATOR.join(documents)  # empty documents too, so each keeps its place
        result = self.compress(joined, rate=rate, target_tokens=target_tokens, method=method, question=question,
                               force_tokens=force_tokens, **options)
        try:
            enc = self.tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise InputError("compress_documents needs a tokenizer with character offsets (a fast one)") from None
        starts, at = [], 0
        for doc in documents:
            starts.append(at)
            at += len(doc) + len(SEPARATOR)
        kept: list[list[int]] = [[] for _ in documents]
        for index in result.kept_token_indices:
            lo, hi = enc["offset_mapping"][index]
            piece = joined[lo:hi]
            first = lo + len(piece) - len(piece.lstrip()) if piece.strip() else lo  # its first visible character
            kept[bisect.bisect_right(starts, first) - 1].append(enc["input_ids"][index])
        return [decode(self.tokenizer, torch.tensor(ids, dtype=torch.long)).strip() for ids in kept]

    def compress_prompt(
        self,
        context: Context,
        instruction: str = "",
        question: str = "",
        rate: float = 0.5,
        target_token: int = -1,
        force_tokens: Sequence[str] = (),
        method: str = DEFAULT_METHOD,
        **options,
    ) -> dict:
        """LLMLingua-compatible call: same arguments, LLMLingua's result keys plus ours.

        As in LLMLingua, ``target_token`` (when positive) takes precedence over ``rate``.
        """
        budget = {"target_tokens": target_token} if target_token and target_token > 0 else {"rate": rate}
        result = self.compress(context, instruction=instruction, question=question,
                               force_tokens=force_tokens, method=method, **budget, **options)
        return {**result.to_dict(), **result.to_llmlingua()}

