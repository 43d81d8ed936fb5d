"""The prompt compression methods by name: DAC and its baselines.

Each is a configuration of one of two mechanisms: staged score-and-drop
(:class:`StagedMethod`) or left-to-right segments (:class:`SegmentedMethod`).
Keyword options override a method's defaults, e.g. ``dac`` with
``stages=1, consecutive=False`` is the one-pass ablation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError
from .scoring import FusedScorer, RandomScorer
from .segmented import SegmentedMethod
from .staged import StagedMethod

Method = StagedMethod | SegmentedMethod


@dataclass(frozen=True)
class MethodSpec:
    description: str
    build: Callable[..., Method]
    options: tuple[str, ...]


def _staged(alpha: float, stages: int | None, consecutive: bool) -> Callable[..., StagedMethod]:
    def build(alpha: float = alpha, fusion: str = "additive", stages: int | None = stages,
              consecutive: bool = consecutive) -> StagedMethod:
        return StagedMethod(FusedScorer(alpha, fusion), stages, consecutive)

    return build


_STAGED_OPTIONS = ("alpha", "fusion", "stages", "consecutive")

METHODS: dict[str, MethodSpec] = {
    "dac": MethodSpec(
        "DAC: attention + self-information, re-scored over stages, consecutive rule",
        _staged(0.8, None, True), _STAGED_OPTIONS),
    "dac-static": MethodSpec(
        "DAC's fused score in one pass (no stages)", _staged(0.8, 1, False), _STAGED_OPTIONS),
    "entropy": MethodSpec(
        "self-information in one pass (Selective-Context style)", _staged(0.0, 1, False), _STAGED_OPTIONS),
    "entropy-dynamic": MethodSpec(
        "self-information re-scored over stages, consecutive rule", _staged(0.0, None, True),
        _STAGED_OPTIONS),
    "attention": MethodSpec(
        "received attention in one pass", _staged(1.0, 1, False), _STAGED_OPTIONS),
    "random": MethodSpec(
        "uniformly random tokens (seeded)",
        lambda seed=0: StagedMethod(RandomScorer(seed), 1, False), ("seed",)),
    "llmlingua": MethodSpec(
        "LLMLingua-style segments, each scored given the compressed prefix (KV cache)",
        lambda segment_tokens=100: SegmentedMethod(segment_tokens), ("segment_tokens",)),
}


def method_names() -> list[str]:
    return list(METHODS)


def build_method(name: str, **options) -> Method:
    """The method ``name`` with ``options`` overriding its defaults."""
    if name not in METHODS:
        raise InputError(f"unknown method '{name}' (choose from: {', '.join(METHODS)})")
    spec = METHODS[name]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise InputError(f"method '{name}' has no option {', '.join(unknown)} (it takes: {', '.join(spec.options)})")
    stages = options.get("stages")
    if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
        raise InputError(f"stages must be a positive integer, got {stages!r}")
    seg = options.get("segment_tokens")
    if seg is not None and (isinstance(seg, bool) or not isinstance(seg, int) or seg < 1):
        raise InputError(f"segment_tokens must be a positive integer, got {seg!r}")
    return spec.build(**options)
