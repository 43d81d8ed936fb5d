"""The evaluation tasks: how examples are built from the data, and scored.

* ``nq`` - multi-document QA as in "Lost in the Middle" (Liu et al., 2023):
  the gold passage among distractor passages of other questions, the gold
  at a chosen position, the question last; best-subspan exact match.
* ``niah`` - needle in a haystack of essays at chosen lengths and depths;
  the needle's number must appear in the answer.
* ``kv-retrieval`` - the JSON key-value retrieval task of the same paper,
  with a chosen number of pairs; the value must appear in the answer.

Examples are deterministic: the same settings and seed give the same
examples, for every method.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .data import load_essays, load_kv, load_nq
from .metrics import best_subspan_em, contains_exactly, normalize_answer

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


@dataclass(frozen=True)
class NQ:
    documents: int = 10
    gold_positions: tuple[int, ...] = (0, 4, 9)  # cycled over the examples
    max_new_tokens: int = 32  # room for a short sentence around the answer
    name: str = "nq"

    def examples(self, data: Path, count: int, seed: int, tokenizer=None) -> list[Example]:
        records = load_nq(data)
        out = []
        for i, record in enumerate(records[:count]):
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

    def examples(self, data: Path, count: int, seed: int, tokenizer=None) -> list[Example]:
        if tokenizer is None:
            raise ValueError("niah needs the tokenizer to size its haystacks")
        haystack = "\n\n".join(load_essays(data))
        ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
        out = []
        grid = [(n, d) for n in self.lengths for d in self.depths]
        for i in range(count):
            length, depth = grid[i % len(grid)]
            rng = random.Random(seed * 100_003 + i)
            number = str(rng.randrange(1_000_000, 10_000_000))
            needle = f" The special magic number is {number}. "
            start = (i // len(grid)) * 997 % max(1, len(ids) - length)  # a different stretch each round
            text = tokenizer.decode(ids[start : start + length])
            cut = _sentence_end(text, int(depth * len(text)))
            out.append(Example(
                self.name, f"niah-{length}-{depth}-{i // len(grid)}", NIAH_INSTRUCTION,
                [text[:cut] + needle + text[cut:]],
                "What is the special magic number mentioned in the text? Answer with the number only.",
                [number], {"length": length, "depth": depth}))
        return out

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return contains_exactly(prediction, example.answers)


def _sentence_end(text: str, at: int) -> int:
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

    def examples(self, data: Path, count: int, seed: int, tokenizer=None) -> list[Example]:
        out = []
        for i, record in enumerate(load_kv(data)[:count]):
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


TASKS = {"nq": NQ, "niah": NeedleInHaystack, "kv-retrieval": KVRetrieval}
