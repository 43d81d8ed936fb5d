"""One way to declare and check a method's options, for prompt methods and KV presses alike.

A method is a dataclass; its options are its fields (``ClassVar`` attributes
such as ``name`` are not options, nor are fields marked ``internal``). Values
are checked against the declared simple types when the method is made, so a
mistyped value is a one-line error (``per_head=maybe`` is not silently true,
``window=abc`` fails before any model runs). Range rules live in each class's
``validate``, which runs whatever the other options are.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import TypeVar

from .errors import InputError

_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "text"}
INTERNAL = {"option": False}  # ``field(metadata=INTERNAL)``: set in code, never by a user


def option_names(cls: type) -> list[str]:
    """The user-settable options of a method class, in declaration order."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("option", True)]


class Configurable:
    """Mixin for method dataclasses: type checks, then the class's own ``validate``."""

    name = "method"  # subclasses: ClassVar[str]

    def __post_init__(self) -> None:
        self.check_types()
        self.validate()

    def validate(self) -> None:
        """Range and consistency rules of this class's options (raise InputError)."""

    def check_types(self) -> None:
        """Every option must have its declared type (annotations of bool/int/float/str/None)."""
        for field in dataclasses.fields(self):
            if not field.metadata.get("option", True):
                continue
            value = getattr(self, field.name)
            annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
            allowed = {t.strip() for t in annotation.split("|")}
            if not allowed <= {"bool", "int", "float", "str", "None"}:
                continue  # a richer annotation: its class checks it in validate
            if value is None and "None" in allowed:
                continue
            if isinstance(value, bool):
                ok = "bool" in allowed
            elif isinstance(value, numbers.Integral):
                ok = bool(allowed & {"int", "float"})
            elif isinstance(value, numbers.Real):
                ok = "float" in allowed
            else:
                ok = isinstance(value, str) and "str" in allowed
            if not ok:
                wanted = " or ".join(_KINDS[t] for t in _KINDS if t in allowed)
                raise InputError(f"{self.name}: {field.name} must be {wanted}, got {value!r}")

    def settings(self) -> dict:
        """The options as set (None left out), for results and reports."""
        return {k: getattr(self, k) for k in option_names(type(self)) if getattr(self, k) is not None}


T = TypeVar("T", bound=Configurable)


def build(registry: Mapping[str, type[T]], kind: str, name: str, options: Mapping[str, object]) -> T:
    """``registry[name](**options)``, with one-line errors for an unknown name or option."""
    if name not in registry:
        raise InputError(f"unknown {kind} '{name}' (choose from: {', '.join(registry)})")
    cls = registry[name]
    allowed = option_names(cls)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"{kind} '{name}' has no option {', '.join(unknown)} (it takes: {', '.join(allowed)})")
    return cls(**options)


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: Sequence[str]) -> dict:
    """``["window=64", "per_head=false"]`` -> ``{"window": 64, "per_head": False}``."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"options look like KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _value(value.strip())
    return options


def parse_spec(spec: str) -> tuple[str, dict]:
    """A method with options in one word, as ``bench --methods`` takes it:
    ``"dac-static:unit=word:alpha=0.5"`` -> ``("dac-static", {"unit": "word", "alpha": 0.5})``."""
    name, *items = spec.split(":")
    return name.strip(), parse_options(items)


__all__ = ["INTERNAL", "Configurable", "build", "option_names", "parse_options", "parse_spec"]
