"""A press as a context manager: compress every cache a model fills inside the block.

``with press(model): model.generate(...)`` needs no cache passed around:
forward pre-hooks on the model's attention layers turn each layer of the
cache transformers makes into a compressed one before its first update
(:func:`ctxpress.kv.cache.convert_cache`), one press state per cache.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..attention import ATTN_IMPLEMENTATION, attention_implementation, register
from ..compat import cache_from_kwargs
from ..errors import InputError
from .cache import PressState, convert_cache, new_state
from .contracts import Press

P = TypeVar("P", bound=Press)


@contextmanager
def compressing(press: P, model: torch.nn.Module) -> Iterator[P]:
    """Compress every cache ``model`` fills inside the block (from its first token) with ``press``."""
    if press.needs_words() is not None:
        raise InputError(f"{press.name} with unit=word needs the prompt's words, which a model hook "
                         "cannot see: use press.cache(model, units=token_words(tokenizer, ids))")
    register()
    states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def state_for(cache) -> PressState:
        if cache not in states:
            states[cache] = new_state(press, model)
        return states[cache]

    def convert(module, args, kwargs):
        cache = cache_from_kwargs(kwargs)
        if cache is not None and hasattr(cache, "layers"):
            convert_cache(cache, state_for, module.layer_idx)

    hooks = [m.register_forward_pre_hook(convert, with_kwargs=True)
             for m in model.modules() if _is_attention(m)]
    if not hooks:
        raise InputError(f"no attention layers with a layer index found in {type(model).__name__}")
    try:
        with attention_implementation(model, ATTN_IMPLEMENTATION):
            yield press
    finally:
        for hook in hooks:
            hook.remove()


def _is_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "layer_idx") and hasattr(module, "o_proj") and hasattr(module, "k_proj")


__all__ = ["compressing"]
