"""Named evaluation grids: which tasks, how many examples, which methods at which ratios.

``quick`` and ``medium`` look at everything at once on a few examples;
``prompt`` and ``kv`` are the instruments decisions rest on: enough examples
for paired intervals to separate methods (see :mod:`ctxpress.bench.stats`);
``rag`` is the retrieval case: prompt methods that know the question, at the
rates a RAG user asks for, on NQ with random and with lexical distractors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import InputError
from ..kv import FULL, PRESSES, press_with_budget
from ..options import parse_spec
from ..prompt.methods import METHODS, build_method
from .synthetic import MultiKeyNeedle
from .tasks import NQ, KVRetrieval, NeedleInHaystack

PROMPT_METHODS = tuple(name for name, method in METHODS.items() if not method.needs_question)  # task-agnostic
KV_METHODS = tuple(name for name, press in PRESSES.items() if press.takes_budget({}))  # all that compress
KV_SETTINGS = ("agnostic", "aware")  # the question is read after compression / is part of the compressed prefill


@dataclass(frozen=True)
class Config:
    """One point of the grid: an optional prompt method, then a KV method (``full`` = none).

    ``kv_setting`` is ``agnostic`` (the context's cache is compressed before
    the question is read, as kvpress evaluates) or ``aware`` (the question is
    inside the compressed prefill, as the SnapKV, PyramidKV and SpindleKV
    papers evaluate).
    """

    prompt_method: str | None = None
    prompt_rate: float | None = None
    kv_method: str = FULL
    kv_ratio: float | None = None
    kv_setting: str = "agnostic"

    @property
    def label(self) -> str:
        parts = []
        if self.prompt_method:
            parts.append(f"{self.prompt_method}@{self.prompt_rate:g}")
        if self.kv_method != FULL:
            aware = ":aware" if self.kv_setting == "aware" else ""
            parts.append(f"kv:{self.kv_method}@{self.kv_ratio:g}{aware}")
        return "+".join(parts) or FULL

    @property
    def question_aware(self) -> bool:
        return self.kv_setting == "aware"

    @property
    def budget(self) -> str:
        """The configurations that compete: same family, same budget, same setting."""
        if self.family == "prompt":
            return f"prompt@{self.prompt_rate:g}"
        if self.family == "kv":
            return f"kv@{self.kv_ratio:g}" + (":aware" if self.question_aware else "")
        return self.label

    @property
    def family(self) -> str:
        if self.prompt_method and self.kv_method != FULL:
            return "combined"
        return "prompt" if self.prompt_method else ("kv" if self.kv_method != FULL else "reference")


@dataclass
class Profile:
    name: str
    tasks: dict  # task name -> (task object, example count)
    prompt_methods: tuple[str, ...] = PROMPT_METHODS
    prompt_rates: tuple[float, ...] = (0.5,)
    kv_methods: tuple[str, ...] = KV_METHODS
    kv_ratios: tuple[float, ...] = (0.3,)
    kv_settings: tuple[str, ...] = ("agnostic",)
    combos: tuple[Config, ...] = field(default_factory=tuple)
    max_new_tokens: int | None = None  # None: each task's own limit

    def configs(self) -> list[Config]:
        grid = [Config()]
        grid += [Config(m, r) for r in self.prompt_rates for m in self.prompt_methods]
        grid += [Config(kv_method=m, kv_ratio=r, kv_setting=s)
                 for s in self.kv_settings for r in self.kv_ratios for m in self.kv_methods]
        return grid + [c for c in self.combos if c not in grid]

    def only(self, methods: list[str]) -> Profile:
        """This grid restricted to ``methods``: names of the profile's prompt or KV methods, or
        variants of them with options (``dac-static:unit=word:alpha=0.5``, checked here, before any
        model loads). The full reference always runs, so ``[FULL]`` is the reference alone. A method
        named twice runs once (its rows share a key)."""
        known = set(self.prompt_methods) | set(self.kv_methods) | {FULL}
        prompt, kv = [], []
        for spec in dict.fromkeys(methods):
            name, options = parse_spec(spec)
            if name not in known:
                raise InputError(f"profile {self.name} has no method {name} "
                                 f"(choose from: {', '.join(sorted(known))})")
            if name in self.prompt_methods:
                build_method(name, **options)
                prompt.append(spec)
            elif name in self.kv_methods:
                press_with_budget(name, self.kv_ratios[0], options=options)
                kv.append(spec)
        return replace(self, prompt_methods=tuple(prompt), kv_methods=tuple(kv),
                       combos=tuple(c for c in self.combos
                                    if c.prompt_method in methods and c.kv_method in methods))


    def at(self, ratios: list[str] | None = None, settings: list[str] | None = None) -> Profile:
        """This grid at other kept fractions (prompt rates and KV ratios alike) or KV settings."""
        changed = self
        if ratios is not None:
            values = []
            for text in ratios:
                try:
                    value = float(text)
                except ValueError:
                    value = math.nan
                if not 0 < value <= 1:
                    raise InputError(f"a ratio is a kept fraction in (0, 1], got {text!r}")
                values.append(value)
            if not values:
                raise InputError("give at least one ratio")
            changed = replace(changed, prompt_rates=tuple(values), kv_ratios=tuple(values))
        if settings is not None:
            unknown = [s for s in settings if s not in KV_SETTINGS]
            if unknown or not settings:
                raise InputError(f"unknown KV setting {', '.join(unknown) or '(none)'} "
                                 f"(choose from: {', '.join(KV_SETTINGS)})")
            changed = replace(changed, kv_settings=tuple(settings))
        return changed


def _quick() -> Profile:
    """About a quarter of an hour: short contexts, three examples per task."""
    return Profile(
        "quick",
        {"nq": (NQ(documents=4, gold_positions=(0, 3)), 3),
         "niah": (NeedleInHaystack(lengths=(512, 768), depths=(0.3, 0.7)), 3),
         "kv-retrieval": (KVRetrieval(pairs=6), 3)},
        combos=(Config("dac", 0.5, "spindlekv", 0.5),),
    )


def _medium() -> Profile:
    """About half an hour: 0.7-2k-token contexts, two KV ratios."""
    return Profile(
        "medium",
        {"nq": (NQ(documents=7, gold_positions=(0, 3, 6)), 6),
         "niah": (NeedleInHaystack(lengths=(1024, 2048), depths=(0.25, 0.75)), 4),
         "kv-retrieval": (KVRetrieval(pairs=12), 4)},
        kv_ratios=(0.5, 0.2),
        combos=(Config("dac", 0.5, "spindlekv", 0.5), Config("dac", 0.5, "snapkv", 0.5)),
    )


def _standard() -> Profile:
    """Many hours on a CPU; sized for a GPU or a larger machine."""
    return Profile(
        "standard",
        {"nq": (NQ(documents=10, gold_positions=(0, 4, 9)), 24),
         "niah": (NeedleInHaystack(lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9)), 9),
         "kv-retrieval": (KVRetrieval(pairs=25), 12)},
        prompt_rates=(0.5, 0.33),
        kv_ratios=(0.5, 0.2, 0.1),
        combos=(Config("dac", 0.5, "spindlekv", 0.5), Config("dac", 0.5, "snapkv", 0.5)),
    )


def _prompt() -> Profile:
    """About two and a half hours: every prompt method at 2x and 3x on 100 NQ questions."""
    return Profile(
        "prompt",
        {"nq": (NQ(documents=5, gold_positions=(0, 2, 4)), 100),
         "niah": (NeedleInHaystack(lengths=(768,), depths=(0.1, 0.3, 0.5, 0.7, 0.9)), 30),
         "kv-retrieval": (KVRetrieval(pairs=8), 30)},
        prompt_rates=(0.5, 0.33), kv_methods=(),
    )


# The rag profile's baselines: today's default, the same with the question leading its attention,
# and the other families that read the question or not.
RAG_BASELINES = ("dac-words", "dac-words:attention_from=question", "llmlingua", "entropy")
# The question-aware methods, measured against those baselines.
RAG_METHODS = tuple(name for name, method in METHODS.items() if method.needs_question)


def _rag() -> Profile:
    """Prompt methods on 100 NQ questions with random and 100 with lexical distractors, at 0.5, 0.33, 0.2."""
    return Profile(
        "rag",
        {"nq": (NQ(documents=5, gold_positions=(0, 2, 4)), 100),
         "nq-lexical": (NQ(documents=5, gold_positions=(0, 2, 4), distractors="lexical", name="nq-lexical"), 100)},
        prompt_methods=(*RAG_METHODS, *RAG_BASELINES), prompt_rates=(0.5, 0.33, 0.2), kv_methods=(),
    )


def _kv() -> Profile:
    """Many hours on this CPU: every press at three ratios, question-agnostic and -aware."""
    return Profile(
        "kv",
        {"niah": (NeedleInHaystack(lengths=(1024, 2048, 4096), depths=(0.1, 0.3, 0.5, 0.7, 0.9)), 30),
         "kv-retrieval": (KVRetrieval(pairs=25), 30),
         "nq": (NQ(documents=5, gold_positions=(0, 2, 4)), 100),
         # Generated tasks are kept only where the uncompressed embedded model scores well enough to
         # show a loss (10 dev examples, full context): niah-multikey with 2 needles 0.60 (with 4: 0.20);
         # variable-tracking (0.10) and common-words (0.10) are left out (docs/benchmarks.md).
         "niah-multikey": (MultiKeyNeedle(lengths=(1024, 2048), needles=2), 30)},
        prompt_methods=(), kv_ratios=(0.5, 0.2, 0.1), kv_settings=KV_SETTINGS,
    )


# Every named grid, built on demand (each call gets a fresh Profile). Times are for the embedded
# model in fp32 on two CPU cores.
PROFILES: dict[str, Callable[[], Profile]] = {
    "quick": _quick, "medium": _medium, "standard": _standard, "prompt": _prompt, "kv": _kv, "rag": _rag,
}


def profile(name: str) -> Profile:
    """The named grid (:data:`PROFILES`)."""
    if name not in PROFILES:
        raise InputError(f"unknown profile '{name}' (choose from: {', '.join(PROFILES)})")
    return PROFILES[name]()
