"""A chat's messages under a :class:`~ctxpress.request.PromptRequest`: which parts are compressed.

Shared by the local chat endpoint and the compressing proxy, so a request's
``prompt_compression`` means the same on both:

* only messages of the request's ``roles`` longer than ``min_tokens`` are compressed;
* text between ``<ctxpress:keep>`` and ``</ctxpress:keep>`` is never
  compressed, and the tags are removed;
* the last paragraph of every user message (after its last blank line) is
  taken for a question and kept whole when it is at most ``min_tokens`` long;
* JSON and code stay valid (:mod:`ctxpress.structured`): a text that is a
  JSON object or array is kept byte-identical (``json: "keep"``) or has only
  its long string values shortened (``json: "values"``); fenced code blocks,
  and a tool's result that is source code, are kept byte-identical
  (``code: "keep"``).

A message's compressed form depends only on its own text, its role and the
policy, never on where it stands in the conversation: a conversation resent
with one more turn is compressed into the same prefix, which is what
providers' prompt caches bill at a discount. So compressed texts can be
cached too: :class:`Shrinker` keeps the most recent ones, and a turn pays
only for its new messages.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .errors import InputError
from .prompt import PromptCompressor
from .prompt.methods import Method
from .request import PromptRequest
from .structured import REPEATED_KEYS, compact, fenced_spans, looks_like_code, parse_json, shorten_values, string_values

KEEP = re.compile(r"<ctxpress:keep>(.*?)</ctxpress:keep>", re.DOTALL)
MIN_SEGMENT_TOKENS = 16  # free text (or a JSON string value) shorter than this is left as it is
MIN_PROSE_WORDS = 8  # a JSON string value of fewer words (a name, an id, a URL) is never shortened
DEFAULT_CACHE_SIZE = 1024  # compressed texts remembered: a few dozen conversations of a few dozen messages


@dataclass
class Tally:
    """Prompt tokens (compressor's tokenizer) before and after compression, for one request."""

    before: int = 0
    after: int = 0
    compressed: int = 0  # messages (or prompts) compressed, from the cache or not
    seconds: float = 0.0
    cache_hits: int = 0  # compressed messages taken from the cache instead of compressed again
    upstream_seconds: float = 0.0  # a proxy's wait for the upstream's answer

    def usage(self) -> dict:
        return {"prompt_tokens_before": self.before, "prompt_tokens_after": self.after,
                "messages_compressed": self.compressed, "compression_seconds": round(self.seconds, 4),
                "cache_hits": self.cache_hits}

    def headers(self) -> dict[str, str]:
        return {"x-ctxpress-prompt-tokens-before": str(self.before),
                "x-ctxpress-prompt-tokens-after": str(self.after)}


@dataclass(frozen=True)
class Shrunk:
    """One text as it is sent, with its token counts before and after: what the cache remembers."""

    text: str
    before: int
    after: int
    compressed: bool


class ShrunkCache:
    """The most recently used compressed texts, at most ``size`` (0: none); safe across threads.

    Keys are digests, so a long message costs its compressed form and a few
    bytes, not its text twice.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise InputError(f"the cache size must be >= 0, got {size}")
        self.size = size
        self._items: OrderedDict[bytes, Shrunk] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Shrunk | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: bytes, value: Shrunk) -> None:
        if not self.size:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Shrinker:
    """Applies a :class:`PromptRequest`'s message policy to message texts with one :class:`PromptCompressor`.

    ``cache_size``: compressed texts remembered (least recently used first
    out; 0 turns the cache off). Compression is deterministic, so a text
    taken from the cache is exactly what compressing it again would give.
    """

    def __init__(self, compressor: PromptCompressor, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.compressor = compressor
        self.cache = ShrunkCache(cache_size)

    def text(self, text: str, policy: PromptRequest, tally: Tally, eligible: bool, question: bool = False,
             tool: bool = False) -> str:
        """``text`` as it is sent: compressed (if ``eligible`` and long enough), keep tags removed.

        ``question``: the text ends a user message; its last paragraph is kept
        whole when it is at most ``min_tokens`` long. ``tool``: the text is a
        tool's result, kept whole if it is source code. JSON and fenced code
        follow the policy's ``json`` and ``code`` (see the module's docstring).
        """
        key = _cache_key(text, policy, question, tool) if eligible and policy.rate != 1 else None
        shrunk = self.cache.get(key) if key is not None else None
        if shrunk is not None:
            tally.cache_hits += 1
        else:
            start = time.perf_counter()
            shrunk = self._shrunk(text, policy, eligible, question, tool)
            if shrunk.compressed:
                tally.seconds += time.perf_counter() - start
                if key is not None:
                    self.cache.put(key, shrunk)
        tally.before += shrunk.before
        tally.after += shrunk.after
        tally.compressed += shrunk.compressed
        return shrunk.text

    def _shrunk(self, text: str, policy: PromptRequest, eligible: bool, question: bool, tool: bool) -> Shrunk:
        count = self.compressor.count_tokens
        structure = parse_json(text)
        if structure is not None:
            tokens = count(text)
            if (not eligible or tokens <= policy.min_tokens or policy.rate == 1 or policy.json == "keep"
                    or structure is REPEATED_KEYS):
                return Shrunk(text, tokens, tokens, False)
            return self._json_values(text, structure, policy, tokens)
        pieces = self._pieces(text, policy, question, tool)
        plain = "".join(piece for piece, _ in pieces)
        tokens = count(plain)
        if not eligible or tokens <= policy.min_tokens or policy.rate == 1 or all(kept for _, kept in pieces):
            return Shrunk(plain, tokens, tokens, False)
        sizes = [0 if kept else count(piece) for piece, kept in pieces]  # only free pieces are compressed
        rate = policy.rate if policy.rate is not None else min(1.0, policy.target_tokens / max(1, sum(sizes)))
        method = policy.method_object()
        out = []
        for (piece, kept), size in zip(pieces, sizes):
            if kept or size < MIN_SEGMENT_TOKENS or rate >= 1:
                out.append(piece)
                continue
            out.append(self._compressed(piece, max(1, round(rate * size)), method))
        joined = "".join(out)
        return Shrunk(joined, tokens, count(joined), True)

    def _compressed(self, piece: str, target: int, method: Method) -> str:
        """``piece`` compressed to ``target`` tokens, or as it is when its first word alone is over that."""
        try:
            result = self.compressor.compress(piece, target_tokens=target, method=method)
        except InputError:  # the budget is smaller than the tokens always kept (a long URL first, say)
            return piece
        return _with_edges(piece, result.compressed_text)

    def _pieces(self, text: str, policy: PromptRequest, question: bool, tool: bool) -> list[tuple[str, bool]]:
        """``text`` as (piece, kept) pairs: keep tags, code and the question marked kept."""
        pieces = _split_kept(text)
        if policy.code == "keep":
            if tool and looks_like_code("".join(piece for piece, _ in pieces)):
                return [("".join(piece for piece, _ in pieces), True)]
            pieces = [split for piece, kept in pieces for split in ([(piece, True)] if kept else _split_fenced(piece))]
        if question:
            pieces = self._question_kept(pieces, policy.min_tokens)
        return pieces

    def prose_values(self, structure: object, policy: PromptRequest) -> dict[str, int]:
        """The string values of a JSON value that ``json: "values"`` shortens, with their token counts."""
        long: dict[str, int] = {}
        for value in string_values(structure):
            if (value not in long and len(value.split()) >= MIN_PROSE_WORDS and not _structured(value, policy)
                    and (n := self.compressor.count_tokens(value)) >= MIN_SEGMENT_TOKENS):
                long[value] = n
        return long

    def _json_values(self, text: str, structure: object, policy: PromptRequest, tokens: int) -> Shrunk:
        """JSON with its long string values compressed as prose, every key and non-string value kept.

        Only prose is shortened: a value of at least :data:`MIN_PROSE_WORDS`
        words and :data:`MIN_SEGMENT_TOKENS` tokens. Identifiers, URLs and
        other single words, and strings that are themselves JSON, code or hold
        a fenced block, are kept whole. The values are compressed in one batch
        at the policy's rate (``target_tokens`` is shared among them), and the
        result is written compactly, which saves the indentation's tokens too.
        """
        count = self.compressor.count_tokens
        long = self.prose_values(structure, policy)
        rate = policy.rate if policy.rate is not None else min(1.0, policy.target_tokens / max(1, sum(long.values())))
        shorter: dict[str, str] = {}
        if long and rate < 1:
            values, method = sorted(long), policy.method_object()
            try:
                results = self.compressor.compress_batch(values, rate=rate, method=method)
                shorter = {value: _with_edges(value, result.compressed_text) for value, result in zip(values, results)}
            except InputError:  # one value's first word is over its budget: each on its own, that one kept
                shorter = {value: self._compressed(value, max(1, round(rate * long[value])), method)
                           for value in values}
        out = compact(shorten_values(structure, shorter.get))
        return Shrunk(out, tokens, count(out), True)

    def _question_kept(self, pieces: list[tuple[str, bool]], limit: int) -> list[tuple[str, bool]]:
        """The last paragraph of the last free piece marked kept, if it is at most ``limit`` tokens."""
        if not pieces or pieces[-1][1]:
            return pieces
        last = pieces[-1][0]
        cut = last.rstrip().rfind("\n\n")
        if cut < 0 or self.compressor.count_tokens(last[cut:]) > limit:
            return pieces
        return [*pieces[:-1], (last[:cut], False), (last[cut:], True)]

    def messages(self, messages: object, policy: PromptRequest, tally: Tally) -> list:
        """Chat messages with the policy applied; anything that is not text passes through.

        Each user message's last text part ends with a question (its final
        paragraph is kept whole); a ``tool`` message's text is a tool result.
        Only ``content`` is read, so an assistant's ``tool_calls`` (and their
        JSON arguments) are never altered.
        """
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list")
        if not all(isinstance(message, dict) for message in messages):
            raise InputError("every message must be an object with a role")
        out = []
        for message in messages:
            role = message.get("role")
            eligible, asks, tool = role in policy.roles, role == "user", role == "tool"
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": self.text(content, policy, tally, eligible, asks, tool)}
            elif isinstance(content, list):
                texts = [j for j, part in enumerate(content) if isinstance(part, dict)
                         and part.get("type") == "text" and isinstance(part.get("text"), str)]
                parts = list(content)
                for j in texts:
                    parts[j] = {**parts[j], "text": self.text(parts[j]["text"], policy, tally, eligible,
                                                              asks and j == texts[-1], tool)}
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


def _split_fenced(text: str) -> list[tuple[str, bool]]:
    """``text`` as (piece, kept) pairs, each fenced code block a kept piece."""
    pieces, at = [], 0
    for start, end in fenced_spans(text):
        if start > at:
            pieces.append((text[at:start], False))
        pieces.append((text[start:end], True))
        at = end
    if at < len(text):
        pieces.append((text[at:], False))
    return pieces


def _structured(value: str, policy: PromptRequest) -> bool:
    """Whether a JSON string value must be kept whole: it is JSON itself, or code under ``code: keep``."""
    if parse_json(value) is not None:
        return True
    return policy.code == "keep" and (looks_like_code(value) or bool(fenced_spans(value)))


def _cache_key(text: str, policy: PromptRequest, question: bool, tool: bool) -> bytes:
    """What a text's compressed form depends on: the text, how it is read, and the policy's compression fields.

    ``roles`` is not among them: it only decides whether a text is compressed at all.
    """
    fields = (question, tool, policy.rate, policy.target_tokens, policy.method, sorted(policy.options.items()),
              policy.min_tokens, policy.json, policy.code)
    head = repr(fields).encode()
    digest = hashlib.blake2b(len(head).to_bytes(8, "big") + head, digest_size=16)
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.digest()


def _with_edges(original: str, compressed: str) -> str:
    """Compressed text with the original's leading and trailing whitespace, so pieces never glue."""
    core = compressed.strip()
    lead = original[: len(original) - len(original.lstrip())]
    trail = original[len(original.rstrip()) :]
    return f"{lead}{core}{trail}"


__all__ = ["DEFAULT_CACHE_SIZE", "KEEP", "Shrinker", "Shrunk", "ShrunkCache", "Tally"]
