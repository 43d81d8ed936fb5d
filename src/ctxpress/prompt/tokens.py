"""Turning a compression request into token ids, atomic units and protections.

A compressor may only keep or drop whole *units*. The smallest are runs of
tokens that together spell whole characters: byte-level BPE splits a
multi-byte character (CJK, emoji) over several tokens, and dropping one of
them would leave a broken character in the output. They come from the
tokenizer's character offsets (tokens whose spans overlap belong together)
or, for tokenizers without offsets, from decoding.

With ``unit="word"`` these character units are grouped further into words
(:func:`ctxpress.words.word_starts`): a word with its leading whitespace, or one trailing
punctuation mark. Dropping a token-level unit can glue its neighbours
("small local" -> "smalllocal") or shred a number; dropping a word cannot.
``unit="phrase"`` groups words once more: a run of capitalised words and
numbers (a name, a date) is one unit (:func:`ctxpress.words.phrase_starts`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from ..errors import InputError
from ..words import decode_ids, line_breaks, phrase_starts, unit_starts_from_decoding, word_starts

UNITS = ("token", "word", "phrase")  # granularity of what a compressor keeps or drops

# Character classes usable in ``force_tokens`` next to literal strings.
FORCE_CLASSES = {
    "[:newline:]": lambda text: "\n" in text,
    "[:digit:]": lambda text: any(ch.isdigit() for ch in text),
    "[:punct:]": lambda text: bool(text.strip())
    and all(unicodedata.category(ch).startswith("P") for ch in text.strip()),
}


@dataclass
class TokenizedContext:
    """The context of one request as the compressor sees it."""

    ids: torch.Tensor  # context token ids, no special tokens
    unit_starts: torch.Tensor  # index of the first token of every unit, ascending
    protected: torch.Tensor  # bool per token: never dropped
    # bool per token: part of a line break kept while the budget allows (all False unless asked for)
    breaks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.breaks is None:
            self.breaks = torch.zeros(len(self.ids), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def unit_starts_from_offsets(offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Tokens whose character spans overlap the previous ones join their unit."""
    starts, end = [], -1
    for i, (lo, hi) in enumerate(offsets):
        if i == 0 or lo >= end:
            starts.append(i)
            end = hi
        else:
            end = max(end, hi)
    return starts


def unit_texts(tokenizer, ids: torch.Tensor, unit_starts: torch.Tensor) -> list[str]:
    bounds = [*unit_starts.tolist(), len(ids)]
    return [decode_ids(tokenizer, ids[a:b].tolist()) for a, b in pairwise(bounds)]


def force_mask(
    tokenizer,
    text: str,
    ids: torch.Tensor,
    unit_starts: torch.Tensor,
    unit_spans: Sequence[tuple[int, int]] | None,
    force: Sequence[str],
) -> torch.Tensor:
    """Tokens protected by ``force``: literal strings or classes from FORCE_CLASSES.

    A literal protects every unit that overlaps an occurrence of it in the
    text, so a word split over several tokens is kept whole. A class protects
    the units whose text belongs to it. Without character offsets a literal
    protects the units whose text contains it.
    """
    mask = torch.zeros(len(ids), dtype=torch.bool)
    if not force:
        return mask
    for item in force:
        if not isinstance(item, str) or item == "":
            raise InputError(f"force_tokens entries must be non-empty strings, got {item!r}")
    bounds = [*unit_starts.tolist(), len(ids)]
    texts = unit_texts(tokenizer, ids, unit_starts)
    protect = np.zeros(len(texts), dtype=bool)
    for item in force:
        if item in FORCE_CLASSES:
            protect |= np.array([FORCE_CLASSES[item](t) for t in texts], dtype=bool)
        elif unit_spans is None:
            protect |= np.array([item in t for t in texts], dtype=bool)
        else:
            protect |= _overlapping(unit_spans, _occurrences(text, item))
    for u in np.flatnonzero(protect):
        mask[bounds[u] : bounds[u + 1]] = True
    return mask


def _occurrences(text: str, literal: str) -> list[tuple[int, int]]:
    found, at = [], text.find(literal)
    while at >= 0:
        found.append((at, at + len(literal)))
        at = text.find(literal, at + 1)
    return found


def _overlapping(spans: Sequence[tuple[int, int]], ranges: list[tuple[int, int]]) -> np.ndarray:
    """Which of the sorted, disjoint ``spans`` overlap any of the ``ranges``."""
    starts = np.array([a for a, _ in spans])
    ends = np.array([b for _, b in spans])
    marks = np.zeros(len(spans) + 1, dtype=np.int64)
    for lo, hi in ranges:
        first = np.searchsorted(ends, lo, side="right")  # first span ending after lo
        stop = np.searchsorted(starts, hi, side="left")  # spans starting before hi
        if first < stop:
            marks[first] += 1
            marks[stop] -= 1
    return np.cumsum(marks[:-1]) > 0


def tokenize_context(
    tokenizer, text: str, force: Sequence[str] = (), unit: str = "token", lines: str = "score"
) -> TokenizedContext:
    """Token ids, units (``unit``: ``"token"``, ``"word"`` or ``"phrase"``) and protection of a context string.

    The line breaks that ``lines`` keeps (:func:`ctxpress.words.line_breaks`)
    are units of their own (also under ``unit="word"``), marked in ``breaks``.
    """
    if unit not in UNITS:
        raise InputError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        starts = unit_starts_from_offsets(offsets)
        bounds = [*starts, len(offsets)]
        spans = [(offsets[a][0], max(hi for _, hi in offsets[a:b])) for a, b in pairwise(bounds)]
    except (NotImplementedError, TypeError, KeyError):
        enc = tokenizer(text, add_special_tokens=False)
        starts = unit_starts_from_decoding(tokenizer, enc["input_ids"])
        spans = None
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    # Protection is decided per character unit; a word holding a protected token is kept whole (Job).
    protected = force_mask(tokenizer, text, ids, torch.tensor(starts, dtype=torch.long), spans, force)
    breaks = torch.zeros(len(ids), dtype=torch.bool)
    if (unit != "token" or lines != "score") and starts:
        bounds = [*starts, len(ids)]
        texts = unit_texts(tokenizer, ids, torch.tensor(starts))
        marks = line_breaks(texts, lines)
        for u in (u for u, mark in enumerate(marks) if mark):
            breaks[bounds[u] : bounds[u + 1]] = True
        if unit != "token":
            words = word_starts(texts, [b - a for a, b in pairwise(bounds)], breaks=marks)
            if unit == "phrase":
                word_bounds = [*words, len(texts)]
                words = [words[w] for w in phrase_starts(
                    ["".join(texts[a:b]) for a, b in pairwise(word_bounds)],
                    [bounds[b] - bounds[a] for a, b in pairwise(word_bounds)])]
            starts = [starts[w] for w in words]
    return TokenizedContext(ids, torch.tensor(starts, dtype=torch.long), protected, breaks)


def encode_plain(tokenizer, text: str) -> torch.Tensor:
    """Ids of a piece kept whole (instruction, question): no special tokens."""
    if not text:
        return torch.zeros(0, dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def bos_prefix(tokenizer) -> torch.Tensor:
    """The BOS token if the tokenizer adds one by default (models expect it first)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return torch.zeros(0, dtype=torch.long)
    probe = tokenizer("a")["input_ids"]
    return torch.tensor([bos] if probe and probe[0] == bos else [], dtype=torch.long)


def decode(tokenizer, ids: torch.Tensor) -> str:
    return decode_ids(tokenizer, ids.tolist())
