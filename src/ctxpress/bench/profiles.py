"""Named evaluation grids: which tasks, how many examples, which methods at which ratios."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InputError
from ..kv import PRESSES
from ..prompt.methods import METHODS
from .tasks import NQ, KVRetrieval, NeedleInHaystack

PROMPT_METHODS = tuple(METHODS)
KV_METHODS = tuple(m for m in PRESSES if m != "full")


@dataclass(frozen=True)
class Config:
    """One point of the grid: an optional prompt method, then a KV method (``full`` = none)."""

    prompt_method: str | None = None
    prompt_rate: float | None = None
    kv_method: str = "full"
    kv_ratio: float | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.prompt_method:
            parts.append(f"{self.prompt_method}@{self.prompt_rate:g}")
        if self.kv_method != "full":
            parts.append(f"kv:{self.kv_method}@{self.kv_ratio:g}")
        return "+".join(parts) or "full"

    @property
    def family(self) -> str:
        if self.prompt_method and self.kv_method != "full":
            return "combined"
        return "prompt" if self.prompt_method else ("kv" if self.kv_method != "full" else "reference")


@dataclass
class Profile:
    name: str
    tasks: dict  # task name -> (task object, example count)
    prompt_methods: tuple[str, ...] = PROMPT_METHODS
    prompt_rates: tuple[float, ...] = (0.5,)
    kv_methods: tuple[str, ...] = KV_METHODS
    kv_ratios: tuple[float, ...] = (0.3,)
    combos: tuple[Config, ...] = field(default_factory=tuple)
    max_new_tokens: int | None = None  # None: each task's own limit

    def configs(self) -> list[Config]:
        grid = [Config()]
        grid += [Config(m, r) for r in self.prompt_rates for m in self.prompt_methods]
        grid += [Config(kv_method=m, kv_ratio=r) for r in self.kv_ratios for m in self.kv_methods]
        return grid + [c for c in self.combos if c not in grid]


def profile(name: str) -> Profile:
    """The named grid. Times are for the embedded model in fp32 on two CPU cores."""
    if name == "quick":  # about a quarter of an hour: short contexts, three examples per task
        return Profile(
            "quick",
            {"nq": (NQ(documents=4, gold_positions=(0, 3)), 3),
             "niah": (NeedleInHaystack(lengths=(512, 768), depths=(0.3, 0.7)), 3),
             "kv-retrieval": (KVRetrieval(pairs=6), 3)},
            combos=(Config("dac", 0.5, "spindlekv", 0.5),),
        )
    if name == "medium":  # about half an hour: 0.7-2k-token contexts, two KV ratios
        return Profile(
            "medium",
            {"nq": (NQ(documents=7, gold_positions=(0, 3, 6)), 6),
             "niah": (NeedleInHaystack(lengths=(1024, 2048), depths=(0.25, 0.75)), 4),
             "kv-retrieval": (KVRetrieval(pairs=12), 4)},
            kv_ratios=(0.5, 0.2),
            combos=(Config("dac", 0.5, "spindlekv", 0.5), Config("dac", 0.5, "snapkv", 0.5)),
        )
    if name == "standard":  # many hours on a CPU; sized for a GPU or a larger machine
        return Profile(
            "standard",
            {"nq": (NQ(documents=10, gold_positions=(0, 4, 9)), 24),
             "niah": (NeedleInHaystack(lengths=(1024, 2048, 4096), depths=(0.1, 0.5, 0.9)), 9),
             "kv-retrieval": (KVRetrieval(pairs=25), 12)},
            prompt_rates=(0.5, 0.33),
            kv_ratios=(0.5, 0.2, 0.1),
            combos=(Config("dac", 0.5, "spindlekv", 0.5), Config("dac", 0.5, "snapkv", 0.5)),
        )
    raise InputError(f"unknown profile '{name}' (choose from: {', '.join(PROFILES)})")


PROFILES = ("quick", "medium", "standard")
