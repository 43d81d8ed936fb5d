"""What differs between the transformers releases ctxpress supports.

transformers 5.x renamed the keyword that carries a KV cache through a model:
older releases take ``past_key_values=``, newer ones ``cache=`` (the old name
warns, and goes in 6.0). ctxpress never guesses from a version number: it
reads the keyword from the model's own ``forward`` signature, so a model
class that has moved and one that has not both get what they expect.
Likewise cache layers are asked for their mask sizes with the query's length
in newer releases and with its ``cache_position`` tensor in the oldest.
"""

from __future__ import annotations

import inspect
from functools import cache as _memo

import torch

CACHE_NAMES = ("cache", "past_key_values")  # newest first


@_memo
def _cache_keyword(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), CACHE_NAMES[-1])


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword ``model`` (and its ``generate``) takes a KV cache by."""
    return _cache_keyword(type(model))


def with_cache(model: torch.nn.Module, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)``."""
    return {cache_keyword(model): cache}


def cache_from_kwargs(kwargs: dict):
    """The cache an attention module was called with, under either keyword (None if none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def query_length(query: int | torch.Tensor) -> int:
    """The new tokens' count given to ``CacheLayer.get_mask_sizes``: an int in newer
    releases, the new tokens' ``cache_position`` tensor in the oldest 5.x."""
    return int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)


__all__ = ["CACHE_NAMES", "cache_from_kwargs", "cache_keyword", "query_length", "with_cache"]
