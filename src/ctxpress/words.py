"""What a word is, for compressors that keep or drop whole words.

Prompt compression (:mod:`ctxpress.prompt.tokens`) and KV eviction
(:mod:`ctxpress.kv.scores`) both group tokens into words: dropping single
tokens glues neighbours ("small local" -> "smalllocal") and shreds numbers
and names, of which a reader (or an attention head) then sees half.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from itertools import pairwise

import torch

MAX_WORD_TOKENS = 32  # longer "words" (hashes, base64) are cut, so budgets stay reachable
PUNCTUATION = ("own", "attached")  # a trailing punctuation mark: a unit of its own, or part of its word


def decode_ids(tokenizer, ids) -> str:
    """The text of ``ids`` exactly as tokenized: special tokens and spacing kept."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def unit_starts_from_decoding(tokenizer, ids: Sequence[int]) -> list[int]:
    """First tokens of the runs that spell whole characters (a unit grows until it decodes
    without U+FFFD): for token ids without character offsets."""
    starts, i = [], 0
    while i < len(ids):
        starts.append(i)
        j = i + 1
        while j < len(ids) and "\ufffd" in decode_ids(tokenizer, ids[i:j]) and j - i < 8:
            j += 1
        i = j
    return starts


def _is_space(text: str) -> bool:
    return text.isspace()


LINE_BREAKS = ("score", "structure", "keep")  # which line breaks a compressor keeps: none, structural, all
# What starts a structured line: a heading, a list item, a quote, a table row, a numbered item.
_STRUCTURED_LINE = re.compile(r"\s*(#|[-*+>|\u2022]|\d+[.)])")


def line_breaks(texts: Sequence[str], mode: str) -> list[bool]:
    """Which character units (by their texts) are line breaks to keep under ``mode``.

    ``"keep"``: every whitespace unit holding a newline. ``"structure"``: only
    those of the breaks that carry the text's structure: a blank line
    (paragraphs), a line break before an indented line or before a heading,
    list item, quote or table row. A newline inside a hard-wrapped paragraph
    is then a space like any other, which costs no budget in prose that
    wraps every 70 characters. ``"score"``: none.
    """
    if mode not in LINE_BREAKS:
        raise ValueError(f"line_breaks must be one of {', '.join(LINE_BREAKS)}, got {mode!r}")
    marks = [False] * len(texts)
    if mode == "score":
        return marks
    u, n = 0, len(texts)
    while u < n:
        if not texts[u].isspace():
            u += 1
            continue
        end = u
        while end < n and texts[end].isspace():
            end += 1
        run = "".join(texts[u:end])
        if "\n" in run and (mode == "keep" or run.count("\n") >= 2 or run.rpartition("\n")[2]
                            or _STRUCTURED_LINE.match("".join(texts[end : end + 3]))):
            for v in range(u, end):
                marks[v] = "\n" in texts[v]
        u = end
    return marks


def _is_punct(text: str) -> bool:
    core = text.strip()
    return bool(core) and all(unicodedata.category(ch)[0] in "PS" for ch in core)


def _is_wide(text: str) -> bool:
    """Scripts written without spaces (CJK) and emoji: each character is a word of its own."""
    return any(unicodedata.east_asian_width(ch) in "WF" for ch in text)


def word_starts(texts: Sequence[str], sizes: Sequence[int], punctuation: str = "own",
                breaks: Sequence[bool] | None = None) -> list[int]:
    """Which character units (given their texts and token counts) begin a word unit.

    A word is a run of non-space text with the whitespace before it (so
    dropping a word never glues its neighbours), its leading punctuation
    included ("(foo", "well-known", "1984" spelled digit by digit). Trailing
    punctuation marks after a word's text (",", ").") are units of their own
    (``punctuation="own"``: a compressed text may drop a comma and keep its
    word) or end the word before them (``"attached"``: "4992383." stays one
    unit, so whoever keeps the number also sees where it ends); a word of
    punctuation alone (' "&"') is one unit. Every character of a script without
    spaces is a word of its own. A word longer than ``MAX_WORD_TOKENS``
    tokens is cut, so that budgets stay reachable. Units marked in ``breaks``
    (line breaks, see :func:`line_breaks`) are units of their own instead of
    the start of the next word, so a compressor can keep the text's lines
    while dropping their first words.
    """
    if punctuation not in PUNCTUATION:
        raise ValueError(f"punctuation must be one of {', '.join(PUNCTUATION)}, got {punctuation!r}")
    own = punctuation == "own"
    n = len(texts)
    # trailing[u]: u is punctuation and only punctuation follows it before the next space or the end
    trailing = [False] * n
    for u in range(n - 1, -1, -1):
        follows_break = u + 1 == n or texts[u + 1][:1].isspace() or trailing[u + 1]
        trailing[u] = _is_punct(texts[u]) and not texts[u][:1].isspace() and follows_break
    starts, length = [], 0
    core = False  # the space-delimited word so far has a unit that is not punctuation
    for u, (text, size) in enumerate(zip(texts, sizes)):
        prev = texts[u - 1] if u else ""
        spaced = text[:1].isspace() or prev[-1:].isspace()
        if u == 0 or spaced:
            core = False
        if u == 0 or (breaks is not None and (breaks[u] or breaks[u - 1])):
            new = True
        elif _is_space(prev):
            new = False  # whitespace belongs to the word after it
        else:
            # Trailing punctuation splits off only a word's tail: a word of punctuation alone ('"&"')
            # is one unit, or dropping its opening quote would glue the rest to the word before.
            new = (spaced or (own and core and (trailing[u] or trailing[u - 1]))
                   or _is_wide(text) or _is_wide(prev) or length + size > MAX_WORD_TOKENS)
        if new:
            starts.append(u)
            length = 0
        length += size
        core = core or not _is_punct(text)
    return starts


# Joiners inside a name or a date: "September 27, 2017", "King Dinis of Portugal", "Procter & Gamble".
PHRASE_JOINERS = frozenset({",", "of", "de", "da", "del", "von", "van", "&", "-", "\u2013"})
MAX_PHRASE_WORDS = 6


def _name_or_number(text: str) -> bool:
    core = text.strip()
    return bool(core) and (core[0].isupper() or any(ch.isdigit() for ch in core))


def phrase_starts(texts: Sequence[str], sizes: Sequence[int]) -> list[int]:
    """Which word units (given their texts and token counts) begin a phrase unit.

    A run of capitalised words and numbers, with the joiners of
    ``PHRASE_JOINERS`` between two of them, is one phrase ("Sigmund Freud",
    "September 27, 2017", "King Dinis of Portugal"): names and dates are the
    answers a reader looks for, and a compressor that keeps "Sigmund" but
    drops "Freud", or the year but not the day, keeps a fact it has
    broken. Every other word is a phrase of its own. A phrase ends after
    ``MAX_PHRASE_WORDS`` words or before it would pass ``MAX_WORD_TOKENS``
    tokens, so budgets stay reachable.
    """
    n = len(texts)
    named = [_name_or_number(t) and "\n" not in t for t in texts]
    number = [any(ch.isdigit() for ch in t) for t in texts]
    # A comma joins only before a number ("27, 2017"), not two clauses ("In 2017, Smith").
    joins = [t.strip() in PHRASE_JOINERS and 0 < u < n - 1 and named[u - 1] and named[u + 1]
             and (t.strip() != "," or number[u + 1]) for u, t in enumerate(texts)]
    starts, words, length = [], 0, 0
    for u, size in enumerate(sizes):
        inside = u > 0 and words < MAX_PHRASE_WORDS and length + size <= MAX_WORD_TOKENS and (
            joins[u] or (named[u] and (named[u - 1] or joins[u - 1])))
        if not inside:
            starts.append(u)
            words, length = 0, 0
        words += 1
        length += size
    return starts


def token_words(tokenizer, ids: Sequence[int], punctuation: str = "own") -> torch.Tensor:
    """Word index of every token of ``ids`` (long, ascending from 0), special tokens included.

    Tokens that spell one character together come first (decoding), then
    characters are grouped by :func:`word_starts`. For any token sequence,
    e.g. a chat-formatted prompt whose KV cache is compressed word by word.
    """
    ids = [int(i) for i in ids]
    chars = unit_starts_from_decoding(tokenizer, ids)
    bounds = [*chars, len(ids)]
    texts = [decode_ids(tokenizer, ids[a:b]) for a, b in pairwise(bounds)]
    words = torch.zeros(len(ids), dtype=torch.long)
    for w in word_starts(texts, [b - a for a, b in pairwise(bounds)], punctuation)[1:]:
        words[chars[w]:] += 1
    return words
