"""KV-cache compression for transformers generation: SpindleKV and the standard baselines."""

from __future__ import annotations

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
        fields = [f for f in cls.__dataclass_fields__ if not f.startswith("_")]
        raise InputError(f"{name}: {exc} (options: {', '.join(fields)})") from None


__all__ = [
    "H2O", "PRESSES", "CompressedCache", "KVPress", "PyramidKV", "SnapKV", "SpindleKV", "StreamingLLM",
    "build_press", "cache_dense_nbytes", "cache_nbytes",
]
