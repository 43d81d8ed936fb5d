"""KV-cache compression for transformers generation: SpindleKV and the standard baselines."""

from __future__ import annotations

import dataclasses

from ..errors import InputError
from .cache import CompressedCache, cache_dense_nbytes, cache_nbytes
from .presses import H2O, KVPress, PyramidKV, SnapKV, StreamingLLM
from .spindle import SpindleKV

PRESSES: dict[str, type[KVPress]] = {
    "full": KVPress,
    "streaming": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "spindlekv": SpindleKV,
}


def build_press(name: str, **options) -> KVPress:
    """The press ``name`` configured with ``options`` (ratio, tokens, window, ...)."""
    if name not in PRESSES:
        raise InputError(f"unknown KV method '{name}' (choose from: {', '.join(PRESSES)})")
    cls = PRESSES[name]
    try:
        return cls(**options)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]  # no ClassVars
        raise InputError(f"{name}: {exc} (options: {', '.join(fields)})") from None


DEFAULT_RATIO = 0.2  # what the command line and the server use when a press needs a budget and none is given


def press_with_budget(name: str, ratio: float | None = None, tokens: int | None = None,
                      options: dict | None = None) -> KVPress:
    """``build_press`` for user-facing entry points: a press that needs a budget gets
    ``DEFAULT_RATIO`` when none is given; one that keeps every token (``full``, or
    ``spindlekv`` with ``evict=False``) refuses a budget instead of ignoring it.
    ``options`` may carry the budget too (``ratio``/``tokens``), but not twice."""
    options = dict(options or {})
    for key, value in (("ratio", ratio), ("tokens", tokens)):
        if key in options and value is not None:
            raise InputError(f"{key} given twice")
    ratio = options.pop("ratio", ratio)
    tokens = options.pop("tokens", tokens)
    if name == "full" or options.get("evict") is False:
        if ratio is not None or tokens is not None:
            raise InputError(f"{name} takes no budget" + (" with evict=false" if name != "full" else ""))
        return build_press(name, **options)
    if ratio is None and tokens is None:
        ratio = DEFAULT_RATIO
    return build_press(name, ratio=ratio, tokens=tokens, **options)


__all__ = [
    "H2O", "PRESSES", "CompressedCache", "KVPress", "PyramidKV", "SnapKV", "SpindleKV", "StreamingLLM",
    "build_press", "cache_dense_nbytes", "cache_nbytes", "press_with_budget",
]
