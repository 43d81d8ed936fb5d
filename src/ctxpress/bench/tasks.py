"""The evaluation tasks: how examples are built from the data, and scored.

* ``nq`` - multi-document QA as in "Lost in the Middle" (Liu et al., 2023):
  the gold passage among distractor passages of other questions, the gold
  at a chosen position, the question last; best-subspan exact match.
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
import random
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


@dataclass(frozen=True)
class NQ:
    documents: int = 10
    gold_positions: tuple[int, ...] = (0, 4, 9)  # cycled over the examples
    max_new_tokens: int = 32  # room for a short sentence around the answer
    name: str = "nq"

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        records = load_nq(data)
        out = []
        for i in split_indices(len(records), split)[:count]:
            record = records[i]
            rng = random.Random(seed * 100_003 + i)
            gold = record["ctxs"][0]
            norm_answers = [normalize_answer(a) for a in record["answers"]]
            pool = [r["ctxs"][0] for j, r in enumerate(records) if j != i]
            distractors = []
            for passage in rng.sample(pool, len(pool)):
                if not any(a and a in normalize_answer(passage["text"]) for a in norm_answers):
                    distractors.append(passage)
                if len(distractors) == self.documents - 1:
                    break
            position = self.gold_positions[i % len(self.gold_positions)] % self.documents
            passages = [*distractors[:position], gold, *distractors[position:]]
            docs = [f"Document [{k + 1}](Title: {p['title']}) {p['text']}" for k, p in enumerate(passages)]
            out.append(Example(self.name, f"nq-{i}", NQ_INSTRUCTION, docs, f"Question: {record['question']}\nAnswer:",
                               list(record["answers"]), {"documents": self.documents, "gold_position": position}))
        return out

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
