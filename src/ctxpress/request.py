"""One prompt-compression request, whichever door it comes in by.

The command line, the server's ``/v1/compress`` body, the ``prompt_compression``
field of a chat request (local model or proxy), batch jobs and the retrieval
adapters all describe the same thing: a method and its options, a budget
(``rate`` or ``target_tokens``, exactly one), the parts kept whole
(question, instruction, forced tokens) and, for chats, which messages are
compressed (``roles``, ``min_tokens``). :class:`PromptRequest` holds it and
checks it once, so every surface accepts the same requests and refuses the
same ones with the same one-line :class:`~ctxpress.errors.InputError`.

Rules, the strictest each surface had before, loosened only where a valid
request somewhere would otherwise become invalid:

* ``rate`` is a number in (0, 1]; ``target_tokens`` an integer >= 1; never both.
* ``min_tokens`` is an integer >= 0: messages of at most that many tokens are
  sent as they are; 0 compresses every non-empty message.
* ``roles`` are names from :data:`ROLES`; an empty list compresses nothing.
* ``json`` is one of :data:`JSON_POLICIES` and ``code`` one of
  :data:`CODE_POLICIES`: what becomes of JSON and of code in compressed messages.
* booleans are not numbers, and unknown fields are refused by name.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import InputError
from .options import parse_options
from .prompt.methods import DEFAULT_METHOD, Method, build_method

ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_ROLES = ("system", "developer", "user", "tool")
DEFAULT_RATE = 0.5  # a chat policy's budget when none is given (the proxy's, or a bare prompt_compression)
DEFAULT_MIN_TOKENS = 256  # a short question is sent as it is
# JSON in a message: "keep" it byte-identical, or shorten its long string "values" (every key kept, it parses).
JSON_POLICIES = ("keep", "values")
# Code (fenced blocks, a tool's source code): "keep" it byte-identical, or "compress" it as prose (it may break).
CODE_POLICIES = ("keep", "compress")
DEFAULT_JSON = "keep"
DEFAULT_CODE = "keep"

# What each field must be, as JSON gives it: (accepted types, wording for the error).
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "rate": ((int, float), "a number"),
    "target_tokens": ((int,), "an integer"),
    "min_tokens": ((int,), "an integer"),
    "method": ((str,), "text"),
    "options": ((dict,), "an object"),
    "question": ((str,), "text"),
    "instruction": ((str,), "text"),
    "json": ((str,), "text"),
    "code": ((str,), "text"),
}
_CHOICES: dict[str, tuple[str, ...]] = {"json": JSON_POLICIES, "code": CODE_POLICIES}
# Fields a chat's prompt_compression may set: the text parts come from the messages themselves.
MESSAGE_FIELDS = frozenset({"rate", "target_tokens", "method", "options", "roles", "min_tokens", "json", "code"})
# Fields a single-context request (/v1/compress without its context) may set.
CONTEXT_FIELDS = frozenset({"rate", "target_tokens", "method", "options", "question", "instruction",
                            "force_tokens"})


@dataclass(frozen=True)
class PromptRequest:
    """What to compress and how much, checked when made.

    ``rate`` (fraction of tokens kept) or ``target_tokens`` (tokens kept), exactly
    one; ``method`` and its ``options``; ``question`` and ``instruction`` kept
    whole around a context; ``force_tokens`` never dropped. For chats:
    ``roles`` whose messages are compressed, and ``min_tokens``: messages of
    at most that many tokens (a short question) are sent as they are. Text
    between ``<ctxpress:keep>`` tags and the question that ends the last user
    message are always kept whole (:mod:`ctxpress.messages`). ``json`` and
    ``code``: what becomes of JSON and code in a compressed message
    (:mod:`ctxpress.structured`).
    """

    rate: float | None = DEFAULT_RATE
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    options: Mapping[str, Any] = field(default_factory=dict)
    question: str = ""
    instruction: str = ""
    force_tokens: tuple[str, ...] = ()
    roles: tuple[str, ...] = DEFAULT_ROLES
    min_tokens: int = DEFAULT_MIN_TOKENS
    json: str = DEFAULT_JSON
    code: str = DEFAULT_CODE
    where: str = field(default="prompt_compression", repr=False, compare=False)  # names the request in errors

    def __post_init__(self) -> None:
        for name, (kinds, wording) in _TYPES.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                self._fail(f"{name} has the wrong type ({type(value).__name__}; {wording} is expected)")
        if (self.rate is None) == (self.target_tokens is None):
            self._fail("give rate or target_tokens (exactly one)")
        if self.rate is not None and not 0 < self.rate <= 1:
            self._fail(f"rate must be in (0, 1], got {self.rate!r}")
        if self.target_tokens is not None and self.target_tokens < 1:
            self._fail(f"target_tokens must be >= 1, got {self.target_tokens!r}")
        if self.min_tokens < 0:
            self._fail(f"min_tokens must be >= 0, got {self.min_tokens!r}")
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown:
            self._fail(f"unknown role {unknown[0]!r} (choose from: {', '.join(ROLES)})")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                self._fail(f"unknown {name} policy {getattr(self, name)!r} (choose from: {', '.join(allowed)})")
        self.method_object()  # a bad method or option fails here, before any model work

    def _fail(self, message: str) -> None:
        raise InputError(f"{self.where}: {message}" if self.where else message)

    @classmethod
    def from_mapping(cls, body: object, *, allowed: frozenset[str] = CONTEXT_FIELDS,
                     where: str = "") -> PromptRequest:
        """A request from a JSON object that must name its own budget (``/v1/compress``, a batch spec)."""
        values = _checked_mapping(body, allowed, where)
        values.setdefault("rate", None)
        return cls(**values, where=where)

    def overridden(self, override: object, *, allowed: frozenset[str] = MESSAGE_FIELDS,
                   where: str = "prompt_compression") -> PromptRequest:
        """This request with the fields of a chat's ``prompt_compression`` object applied.

        A request's ``rate`` replaces a configured ``target_tokens`` and the
        other way round, so a budget is never given twice. Errors name
        ``where`` the bad field came from.
        """
        if override is None:
            return self
        changes = _checked_mapping(override, allowed, where)
        if "rate" in changes and "target_tokens" not in changes:
            changes["target_tokens"] = None
        if "target_tokens" in changes and "rate" not in changes:
            changes["rate"] = None
        return replace(self, **changes, where=where)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PromptRequest:
        """A request from the command line's options (absent ones keep their defaults)."""
        values: dict[str, Any] = {"method": args.method, "options": parse_options(args.options)}
        if args.rate is not None or args.target_tokens is not None:  # neither: the default budget
            values.update(rate=args.rate, target_tokens=args.target_tokens)
        for name in ("question", "instruction", "min_tokens"):
            if getattr(args, name, None) is not None:
                values[name] = getattr(args, name)
        if getattr(args, "force_tokens", None) is not None:
            values["force_tokens"] = tuple(args.force_tokens)
        for name in ("json", "code"):
            if getattr(args, f"{name}_policy", None) is not None:
                values[name] = getattr(args, f"{name}_policy")
        if getattr(args, "compress_roles", None) is not None:
            values["roles"] = tuple(args.compress_roles)
        return cls(**values, where="")

    def method_object(self) -> Method:
        """The configured method (built anew: methods are small, and a request may outlive a model)."""
        return build_method(self.method, **self.options)

    @property
    def budget(self) -> dict[str, float | int]:
        """``{"rate": r}`` or ``{"target_tokens": n}``, as the compressor's keyword arguments."""
        return {"rate": self.rate} if self.rate is not None else {"target_tokens": self.target_tokens}

    def compress(self, compressor, context: str | Sequence[str]):
        """``context`` compressed by ``compressor`` (a :class:`~ctxpress.prompt.PromptCompressor`) as asked."""
        return compressor.compress(context, method=self.method_object(), question=self.question,
                                   instruction=self.instruction, force_tokens=list(self.force_tokens),
                                   **self.budget)


def _checked_mapping(body: object, allowed: frozenset[str], where: str) -> dict[str, Any]:
    """``body`` as keyword arguments of :class:`PromptRequest`: an object with known fields, lists as tuples."""
    prefix = f"{where}: " if where else ""
    if not isinstance(body, Mapping):
        raise InputError(f"{where or 'the request'} must be an object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InputError(f"{prefix}unknown field {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    values = dict(body)
    for name, what in (("roles", "role names"), ("force_tokens", "strings")):
        if name in values:
            items = values[name]
            if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
                raise InputError(f"{prefix}{name} must be a list of {what}")
            values[name] = tuple(items)
    known = {f.name for f in fields(PromptRequest)}
    return {k: v for k, v in values.items() if k in known}


__all__ = ["CODE_POLICIES", "CONTEXT_FIELDS", "DEFAULT_CODE", "DEFAULT_JSON", "DEFAULT_MIN_TOKENS", "DEFAULT_RATE",
           "DEFAULT_ROLES", "JSON_POLICIES", "MESSAGE_FIELDS", "ROLES", "PromptRequest"]
