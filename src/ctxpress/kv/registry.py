"""Every KV press by name, and building one from user options."""

from __future__ import annotations

from ..errors import InputError
from ..options import build
from .contracts import Press
from .presses import (
    H2O,
    KVPress,
    PyramidKV,
    QuantizedKV,
    SnapKV,
    SnapKVTiered,
    SnapKVWords,
    SpindleKV,
    SpindleKVWords,
    StreamingLLM,
)

FULL = KVPress.name  # no compression: the reference every press is compared with

PRESSES: dict[str, type[Press]] = {
    press.name: press
    for press in (KVPress, StreamingLLM, H2O, SnapKV, SnapKVWords, SnapKVTiered, PyramidKV, SpindleKV,
                  SpindleKVWords, QuantizedKV)
}

DEFAULT_METHOD = SnapKVWords.name  # of the command line and the server (docs/results/kv-words-dev)
DEFAULT_RATIO = 0.2  # what the command line and the server use when a press needs a budget and none is given


def build_press(name: str, **options) -> Press:
    """The press ``name`` configured with ``options`` (ratio, tokens, window, ...)."""
    return build(PRESSES, "KV method", name, options)


def press_with_budget(name: str, ratio: float | None = None, tokens: int | None = None,
                      options: dict | None = None) -> Press:
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
    if name in PRESSES and PRESSES[name].takes_budget(options) and ratio is None and tokens is None:
        ratio = DEFAULT_RATIO
    budget = {k: v for k, v in (("ratio", ratio), ("tokens", tokens)) if v is not None}
    return build_press(name, **budget, **options)


__all__ = ["DEFAULT_METHOD", "DEFAULT_RATIO", "FULL", "PRESSES", "build_press", "press_with_budget"]
