"""Option groups more than one command takes, written once: model, budget, method, progress."""

from __future__ import annotations

import argparse
import dataclasses

from ..models import DEFAULT_MODEL, EMBEDDED_MODELS
from ..options import option_names
from ..prompt.methods import DEFAULT_METHOD, METHODS
from .common import positive_int, rate

Group = argparse.ArgumentParser | argparse._ArgumentGroup


def add_model_options(p: Group) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"embedded model ({', '.join(EMBEDDED_MODELS)}), local directory or hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")


def add_budget(p: Group, *, required: bool, rate_help: str, tokens_help: str) -> None:
    """``--rate`` or ``--target-tokens``, never both: the two ways to size a prompt-compression budget."""
    budget = p.add_mutually_exclusive_group(required=required)
    budget.add_argument("--rate", type=rate, help=rate_help)
    budget.add_argument("--target-tokens", type=positive_int, metavar="N", help=tokens_help)


def add_method(p: Group, help: str) -> None:
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), metavar="METHOD", help=help)


def add_method_options(p: Group) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="method option, e.g. stages=4, alpha=0.5, fusion=multiplicative, consecutive=false, "
                        "seed=1, segment_tokens=50 (repeatable; each method's options and defaults are listed below)")


def add_no_progress(p: Group) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="never show the progress bar")


def _defaults(cls: type) -> str:
    """``stages=auto, consecutive=true, ...``: a method's options and their defaults, for the help."""
    def shown(value) -> str:
        if value is None or value is dataclasses.MISSING:
            return "auto" if value is None else "required"
        return str(value).lower() if isinstance(value, bool) else str(value)

    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return ", ".join(f"{k}={shown(fields[k])}" for k in option_names(cls))


def methods_epilog() -> str:
    """Every prompt method with its description and option defaults, for a command's epilog."""
    return "Methods: " + "; ".join(f"{name}: {cls.description()} ({_defaults(cls)})"
                                   for name, cls in METHODS.items()) + "."


__all__ = ["add_budget", "add_method", "add_method_options", "add_model_options", "add_no_progress",
           "methods_epilog"]
