"""A chat's messages under a :class:`~ctxpress.request.PromptRequest`: which parts are compressed.

Shared by the local chat endpoint and the compressing proxy, so a request's
``prompt_compression`` means the same on both:

* only messages of the request's ``roles`` longer than ``min_tokens`` are compressed;
* text between ``<ctxpress:keep>`` and ``</ctxpress:keep>`` is never
  compressed, and the tags are removed;
* the last paragraph of the last user message (after its last blank line)
  is taken for the question and kept whole when it is at most
  ``min_tokens`` long.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .errors import InputError
from .prompt import PromptCompressor
from .request import PromptRequest

KEEP = re.compile(r"<ctxpress:keep>(.*?)</ctxpress:keep>", re.DOTALL)
MIN_SEGMENT_TOKENS = 16  # free text shorter than this between kept spans is left as it is


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
    """Applies a :class:`PromptRequest`'s message policy to message texts with one :class:`PromptCompressor`."""

    def __init__(self, compressor: PromptCompressor) -> None:
        self.compressor = compressor

    def text(self, text: str, policy: PromptRequest, tally: Tally, eligible: bool, question: bool = False) -> str:
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
        method = policy.method_object()
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

    def messages(self, messages: object, policy: PromptRequest, tally: Tally) -> list:
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


__all__ = ["KEEP", "Shrinker", "Tally"]
