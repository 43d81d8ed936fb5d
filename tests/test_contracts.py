"""A press and a store written from the contracts alone run through the cache and generation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ctxpress.compat import with_cache
from ctxpress.kv import StreamingLLM, answer_questions
from ctxpress.kv.cache import CompressedCache, compressed_cache
from ctxpress.kv.contracts import PrefilledLayer, Press, Store

from conftest import N, compressed, greedy


class PlainStore(Store):
    """Kept tokens as they are: what the contract asks of a store, and nothing more."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def __len__(self) -> int:
        return self.keys.shape[-2]

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    def append(self, keys: torch.Tensor, values: torch.Tensor, position: int) -> None:
        self.keys = torch.cat([self.keys, keys], dim=-2)
        self.values = torch.cat([self.values, values], dim=-2)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.keys, self.values = self.keys[beam_idx], self.values[beam_idx]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class KeepRecent(Press):
    """Every layer keeps the last ``keep`` prompt tokens."""

    name = "keep-recent"

    def __init__(self, keep: int) -> None:
        self.keep = keep

    @classmethod
    def takes_budget(cls, options: Mapping[str, object]) -> bool:
        return True

    def cache(self, model: torch.nn.Module, units: torch.Tensor | None = None) -> CompressedCache:
        return compressed_cache(self, model, units)

    def settings(self) -> dict:
        return {"keep": self.keep}

    def score(self, query, key, scaling, columns) -> None:
        return None

    def compress(self, layers: Sequence[PrefilledLayer], model: torch.nn.Module) -> None:
        for layer in layers:
            layer.compress_to(PlainStore(layer.keys[..., -self.keep :, :], layer.values[..., -self.keep :, :]))


def test_a_press_and_store_from_the_contracts_alone_generate_as_the_library_does(lm, prompt):
    """Keeping the last 40 tokens is what StreamingLLM without sinks does: same tokens kept, same answer."""
    model = lm.model
    mine, theirs = KeepRecent(40).cache(model), StreamingLLM(tokens=40, sinks=0).cache(model)
    out = greedy(model, prompt, **with_cache(model, mine), min_new_tokens=12)
    assert out.shape[1] == N + 12
    assert torch.equal(out, greedy(model, prompt, **with_cache(model, theirs), min_new_tokens=12))
    assert all(isinstance(layer.store, PlainStore) and len(layer.store) == 40 + 11 for layer in mine.layers)
    assert mine.nbytes() == theirs.nbytes() < compressed(model, StreamingLLM(ratio=0.5), prompt).nbytes()


def test_generation_takes_any_press(tiny_lm):
    [result] = answer_questions(tiny_lm, "alpha beta gamma 12345 delta " * 20, ["what?"], KeepRecent(30),
                                max_new_tokens=3)
    assert result.method == "keep-recent" and result.settings == {"keep": 30, "question_aware": False}
    assert result.cache_bytes < result.full_cache_bytes
