"""The evaluation tasks: how examples are built from the data, and scored.

* ``nq`` - multi-document QA as in "Lost in the Middle" (Liu et al., 2023):
  the gold passage among distractor passages of other questions, the gold
  at a chosen position, the question last; best-subspan exact match.
* ``nq-lexical`` - the same, with the distractors that share the most words
  with the question (BM25) instead of random ones: passages on the question's
  topic, so relevance to the question no longer tells the gold apart.
* ``niah`` - needle in a haystack of essays at chosen lengths and depths;
  the needle's number must appear in the answer.
* ``kv-retrieval`` - the JSON key-value retrieval task of the same paper,
  with a chosen number of pairs; the value must appear in the answer.

Examples are deterministic: the same settings, seed and split give the
same examples, for every method. Each data file is cut into two disjoint
splits: ``dev`` (its first half) for tuning, ``report`` (its second half) for
the numbers a default is judged by.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .data import load_essays, load_kv, load_nq
from .metrics import answer_survives, best_subspan_em, contains_exactly, normalize_answer

SPLITS = ("dev", "report")


def split_indices(total: int, split: str) -> range:
    """The items of a ``total``-item source that belong to ``split``: dev the first half, report the rest."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from: {', '.join(SPLITS)})")
    half = total // 2
    return range(0, half) if split == "dev" else range(half, total)

NQ_INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
                  "(some of which might be irrelevant).")
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
NIAH_INSTRUCTION = "Read the text below and answer the question about it."


@dataclass
class Example:
    task: str
    id: str
    instruction: str
    documents: list[str]  # the compressible context
    question: str  # kept whole, after the context
    answers: list[str]
    meta: dict = field(default_factory=dict)

    @property
    def context(self) -> str:
        return "\n\n".join(self.documents)

    def survives(self, context: str) -> float:
        """1.0 if a gold answer still occurs (normalised) in ``context``: the cheapest sign of a lost fact."""
        return answer_survives(context, self.answers)


DISTRACTORS = ("random", "lexical")  # how NQ picks the passages around the gold one

# Words too common to say what a question is about (BM25's idf would weigh them down; dropping them
# keeps "who was the ..." from matching every passage at all).
STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "been", "by", "did", "do", "does", "for", "from", "had", "has",
    "have", "he", "her", "his", "how", "i", "in", "is", "it", "its", "of", "on", "or", "she", "that", "the",
    "their", "them", "they", "this", "to", "was", "were", "what", "when", "where", "which", "who", "whom",
    "whose", "why", "will", "with",
})


def lexical_words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` without stopwords: the terms BM25 matches."""
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]


@dataclass(frozen=True)
class BM25:
    """Okapi BM25 over a fixed list of texts, indexed once and queried many times.

    The postings map each term to ``(text index, term count)`` pairs, so a query
    touches only the texts that share one of its words.
    """

    postings: dict[str, list[tuple[int, int]]]
    lengths: list[int]
    k1: float = 1.5
    b: float = 0.75

    @classmethod
    def index(cls, texts: list[str], k1: float = 1.5, b: float = 0.75) -> BM25:
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths = []
        for j, text in enumerate(texts):
            words = lexical_words(text)
            lengths.append(len(words))
            for word, count in Counter(words).items():
                postings.setdefault(word, []).append((j, count))
        return cls(postings, lengths, k1, b)

    def scores(self, query: str) -> dict[int, float]:
        """The score of every text sharing a word with ``query`` (each distinct query word counts once)."""
        total = len(self.lengths)
        average = sum(self.lengths) / max(1, total) or 1.0
        out: dict[int, float] = {}
        for word in dict.fromkeys(lexical_words(query)):
            hits = self.postings.get(word, ())
            idf = math.log(1 + (total - len(hits) + 0.5) / (len(hits) + 0.5))  # never negative
            for j, count in hits:
                norm = self.k1 * (1 - self.b + self.b * self.lengths[j] / average)
                out[j] = out.get(j, 0.0) + idf * count * (self.k1 + 1) / (count + norm)
        return out

    def ranking(self, query: str) -> list[int]:
        """Every text's index, best match first; ties (and texts sharing no word) in index order."""
        scores = self.scores(query)
        return sorted(range(len(self.lengths)), key=lambda j: (-scores.get(j, 0.0), j))


def holds_answer(normalized_text: str, normalized_answers: list[str]) -> bool:
    """Whether a (normalised) passage contains a gold answer: such a passage is never a distractor."""
    return any(a and a in normalized_text for a in normalized_answers)


@dataclass(frozen=True)
class NQ:
    """Multi-document QA; ``distractors`` picks the passages around the gold one.

    ``random``: passages of other questions in a seeded random order, as in
    "Lost in the Middle". ``lexical``: the passages of other questions that
    score highest under BM25 against the question, best first - distractors on
    the question's topic, which a method ranking passages by relevance cannot
    drop for free (BM25 has no seed: every seed gives the same examples). Both
    skip any passage holding a gold answer, and the gold passage goes at the
    cycled position either way.
    """

    documents: int = 10
    gold_positions: tuple[int, ...] = (0, 4, 9)  # cycled over the examples
    max_new_tokens: int = 32  # room for a short sentence around the answer
    name: str = "nq"
    distractors: str = "random"

    def __post_init__(self) -> None:
        if self.distractors not in DISTRACTORS:
            raise ValueError(f"unknown distractors {self.distractors!r} (choose from: {', '.join(DISTRACTORS)})")

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        records = load_nq(data)
        lexical = self.distractors == "lexical"
        # Built once per call and shared by its examples: the index of every record's gold passage
        # (its title too, as the reader sees it) and the normalised texts the answer check reads.
        index = BM25.index([f"{r['ctxs'][0]['title']} {r['ctxs'][0]['text']}" for r in records]) if lexical else None
        normalized = [normalize_answer(r["ctxs"][0]["text"]) for r in records] if lexical else []
        out = []
        for i in split_indices(len(records), split)[:count]:
            record = records[i]
            gold = record["ctxs"][0]
            norm_answers = [normalize_answer(a) for a in record["answers"]]
            if index is None:
                distractors = self._random(records, i, seed, norm_answers)
            else:
                distractors = self._lexical(records, i, index, normalized, norm_answers)
            position = self.gold_positions[i % len(self.gold_positions)] % self.documents
            passages = [*distractors[:position], gold, *distractors[position:]]
            docs = [f"Document [{k + 1}](Title: {p['title']}) {p['text']}" for k, p in enumerate(passages)]
            out.append(Example(self.name, f"nq-{i}", NQ_INSTRUCTION, docs, f"Question: {record['question']}\nAnswer:",
                               list(record["answers"]), {"documents": self.documents, "gold_position": position}))
        return out

    def _random(self, records: list[dict], i: int, seed: int, norm_answers: list[str]) -> list[dict]:
        """Other questions' passages in a random order fixed by ``seed`` and the example."""
        rng = random.Random(seed * 100_003 + i)
        pool = [r["ctxs"][0] for j, r in enumerate(records) if j != i]
        distractors = []
        for passage in rng.sample(pool, len(pool)):
            if not holds_answer(normalize_answer(passage["text"]), norm_answers):
                distractors.append(passage)
            if len(distractors) == self.documents - 1:
                break
        return distractors

    def _lexical(self, records: list[dict], i: int, index: BM25, normalized: list[str],
                 norm_answers: list[str]) -> list[dict]:
        """Other questions' passages by BM25 against the question, best first.

        The data repeats a few passages (questions asked twice), and equal
        texts score equally, so a text already placed - the gold's included -
        is skipped: a repeat would be a second gold or a wasted slot.
        """
        seen = {records[i]["ctxs"][0]["text"]}
        distractors = []
        for j in index.ranking(records[i]["question"]):
            passage = records[j]["ctxs"][0]
            if j == i or passage["text"] in seen or holds_answer(normalized[j], norm_answers):
                continue
            seen.add(passage["text"])
            distractors.append(passage)
            if len(distractors) == self.documents - 1:
                break
        return distractors

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return best_subspan_em(prediction, example.answers)


@dataclass(frozen=True)
class NeedleInHaystack:
    lengths: tuple[int, ...] = (1024, 2048)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    max_new_tokens: int = 32  # "The special magic number ... is 1234567." is 18 tokens
    name: str = "niah"

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        ids = haystack_ids(data, tokenizer, split)
        out = []
        grid = [(n, d) for n in self.lengths for d in self.depths]
        first = SPLITS.index(split) * 100_000  # disjoint needle seeds per split
        for i in range(count):
            length, depth = grid[i % len(grid)]
            rng = random.Random(seed * 100_003 + first + i)
            number = str(rng.randrange(1_000_000, 10_000_000))
            needle = f" The special magic number is {number}. "
            text = stretch(tokenizer, ids, length, i // len(grid))
            cut = sentence_end(text, int(depth * len(text)))
            out.append(Example(
                self.name, f"niah-{length}-{depth}-{i // len(grid)}", NIAH_INSTRUCTION,
                [text[:cut] + needle + text[cut:]],
                "What is the special magic number mentioned in the text? Answer with the number only.",
                [number], {"length": length, "depth": depth}))
        return out

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return contains_exactly(prediction, example.answers)


def haystack_ids(data: Path, tokenizer, split: str) -> list[int]:
    """Token ids of the essays of ``split`` (each split has essays of its own), concatenated."""
    if tokenizer is None:
        raise ValueError("haystack tasks need the tokenizer to size their haystacks")
    essays = load_essays(data)
    return tokenizer("\n\n".join(essays[i] for i in split_indices(len(essays), split)),
                     add_special_tokens=False)["input_ids"]


def stretch(tokenizer, ids: list[int], length: int, round_: int) -> str:
    """``length`` tokens of the haystack as text, a different stretch for each round."""
    start = round_ * 997 % max(1, len(ids) - length)
    return tokenizer.decode(ids[start : start + length])


def sentence_end(text: str, at: int) -> int:
    """The position just after the first sentence end at or after ``at`` (or ``at``)."""
    for i in range(at, len(text)):
        if text[i] == "." and (i + 1 == len(text) or text[i + 1].isspace()):
            return i + 1
    return at


@dataclass(frozen=True)
class KVRetrieval:
    pairs: int = 75
    max_new_tokens: int = 64  # a UUID alone is 33 tokens of SmolLM2's tokenizer
    name: str = "kv-retrieval"

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        out = []
        records_all = load_kv(data)
        for i in split_indices(len(records_all), split)[:count]:
            record = records_all[i]
            records = [tuple(r) for r in record["ordered_kv_records"]]
            gold = (record["key"], record["value"])
            where = records.index(gold)
            others = [r for r in records if r != gold][: self.pairs - 1]
            position = round(where * (len(others)) / max(1, len(records) - 1))  # same relative position
            kept = [*others[:position], gold, *others[position:]]
            data_json = json.dumps(dict(kept), indent=1)
            out.append(Example(self.name, f"kv-{i}", KV_INSTRUCTION, [f"JSON data:\n{data_json}"],
                               f'Key: "{gold[0]}"\nCorresponding value:', [gold[1]],
                               {"pairs": len(kept), "gold_position": position}))
        return out

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return contains_exactly(prediction, example.answers)
