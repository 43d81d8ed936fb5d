"""Long-context tasks generated in code, in the style of RULER (Hsieh et al., 2024).

Nothing is downloaded: the haystacks are the evaluation essays of the split,
the facts are drawn from a seeded generator. Each task stresses a way a
compressed context loses information that a single needle does not:

* ``niah-multikey`` - several needles with distinct keys; the question names
  one, so a method must keep the right one, not any number.
* ``variable-tracking`` - a chain of assignments ``VAR B = VAR A`` scattered
  through the haystack; every link must survive to name all variables.
* ``common-words`` - a long list of words, a few of them frequent; the answer
  depends on counts over the whole list, not on one span.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from .data import load_essays
from .tasks import SPLITS, Example, haystack_ids, sentence_end, split_indices, stretch

KEYS = ("Nairobi", "Lisbon", "Osaka", "Quito", "Oslo", "Lagos", "Hanoi", "Perth", "Lima", "Dakar",
        "Tbilisi", "Austin", "Bergen", "Cusco", "Fez", "Galway", "Izmir", "Jaipur", "Kyoto", "Malmo")


def _insert(text: str, pieces: list[tuple[float, str]]) -> tuple[str, list[float]]:
    """``text`` with each (depth, sentence) inserted at the first sentence end after that depth."""
    cuts = [sentence_end(text, int(depth * len(text))) for depth, _ in pieces]
    out, last = [], 0
    for cut, (_, sentence) in sorted(zip(cuts, pieces), key=lambda x: x[0]):
        out += [text[last:cut], f" {sentence} "]
        last = cut
    out.append(text[last:])
    return "".join(out), [cut / max(1, len(text)) for cut in cuts]


def _rng(seed: int, split: str, i: int) -> random.Random:
    return random.Random(seed * 100_003 + SPLITS.index(split) * 100_000 + i)


def recall(prediction: str, answers: list[str]) -> float:
    """Fraction of the answers named in the prediction (RULER's score for list answers)."""
    return sum(a in prediction for a in answers) / len(answers)


class _InHaystack:
    """A task whose facts are sentences inserted into a stretch of the split's essays."""

    lengths: tuple[int, ...]
    name: str

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        ids = haystack_ids(data, tokenizer, split)
        out = []
        for i in range(count):
            length = self.lengths[i % len(self.lengths)]
            out.append(self.example(_rng(seed, split, i), stretch(tokenizer, ids, length, i), f"{length}-{i}",
                                    {"length": length}))
        return out

    def example(self, rng: random.Random, text: str, ident: str, meta: dict) -> Example:
        """One example: facts drawn from ``rng`` put into the haystack ``text``."""
        raise NotImplementedError


@dataclass(frozen=True)
class MultiKeyNeedle(_InHaystack):
    lengths: tuple[int, ...] = (1024, 2048)
    needles: int = 4
    max_new_tokens: int = 32
    name: str = "niah-multikey"

    def example(self, rng: random.Random, text: str, ident: str, meta: dict) -> Example:
        keys = rng.sample(KEYS, self.needles)
        numbers = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
        depths = [rng.uniform(0.05, 0.95) for _ in keys]
        text, where = _insert(text, [(d, f"The special magic number for {k} is {n}.")
                                     for d, k, n in zip(depths, keys, numbers)])
        target = rng.randrange(self.needles)
        return Example(
            self.name, f"{self.name}-{ident}", "Read the text below and answer the question about it.",
            [text], f"What is the special magic number for {keys[target]} mentioned in the text? "
                    "Answer with the number only.",
            [numbers[target]], {**meta, "depth": round(where[target], 3), "needles": self.needles})

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return float(example.answers[0] in prediction)


@dataclass(frozen=True)
class VariableTracking(_InHaystack):
    lengths: tuple[int, ...] = (1024, 2048)
    hops: int = 3
    max_new_tokens: int = 24
    name: str = "variable-tracking"

    def example(self, rng: random.Random, text: str, ident: str, meta: dict) -> Example:
        names: list[str] = []
        while len(names) < 2 * (self.hops + 1):
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        chain, decoy = names[: self.hops + 1], names[self.hops + 1:]
        value, other = rng.sample(range(10_000, 100_000), 2)
        placed = []
        for links, number in ((chain, value), (decoy, other)):  # the decoy chain holds another value
            statements = [f"VAR {links[0]} = {number}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(links)]
            depths = sorted(rng.uniform(0.05, 0.95) for _ in statements)  # assigned before it is copied
            placed += list(zip(depths, statements))
        text, _ = _insert(text, placed)
        return Example(
            self.name, f"{self.name}-{ident}",
            "Memorize the variable assignments in the text below and answer the question about them.",
            [text], f"Which variables are assigned the value {value}, directly or through other variables? "
                    "Answer with the variable names only.",
            chain, {**meta, "hops": self.hops})

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return recall(prediction, example.answers)


@dataclass(frozen=True)
class CommonWords:
    frequent: int = 3
    frequent_count: int = 12
    rare: int = 60
    rare_count: int = 3
    max_new_tokens: int = 24
    name: str = "common-words"

    def examples(self, data: Path, count: int, seed: int, tokenizer=None, split: str = "report") -> list[Example]:
        essays = load_essays(data)
        vocabulary = sorted({w for i in split_indices(len(essays), split)
                             for w in re.findall(r"\b[a-z]{5,9}\b", essays[i])})
        out = []
        for i in range(count):
            rng = _rng(seed, split, i)
            words = rng.sample(vocabulary, self.frequent + self.rare)
            top = words[: self.frequent]
            items = top * self.frequent_count + words[self.frequent:] * self.rare_count
            rng.shuffle(items)
            listing = "\n".join(f"{k + 1}. {w}" for k, w in enumerate(items))
            out.append(Example(
                self.name, f"{self.name}-{i}", "Below is a numbered list of words.", [listing],
                f"What are the {self.frequent} most frequent words in the list above? Answer with the words only.",
                top, {"words": len(items)}))
        return out

    @staticmethod
    def score(prediction: str, example: Example) -> float:
        return recall(prediction.lower(), example.answers)


__all__ = ["CommonWords", "MultiKeyNeedle", "VariableTracking"]
