"""What every command shares: exit codes, argparse with one-line errors, value types, reading input text."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable

from ..errors import InputError

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def read_text(path: str | None) -> str:
    """Read UTF-8 text from a file or stdin ('-' or no path), rejecting binary data."""
    if path in (None, "-"):
        if path is None and sys.stdin.isatty():
            raise InputError("no input: give a FILE, or '-' / a pipe for standard input")
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except IsADirectoryError:
            raise InputError(f"{path} is a directory") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from None
        name = path
    if b"\x00" in data:
        raise InputError(f"{name} looks like a binary file (it contains NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not valid UTF-8 (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise InputError(f"{name} is empty")
    return text.removeprefix("\ufeff")


def items(text: str) -> list[str]:
    """The non-empty entries of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def number(cast: type, valid: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: ``cast`` the text and check it, with a one-line message."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if cast is int else 'a number'}: {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    return parse


rate = number(float, lambda v: 0 < v <= 1, "in (0, 1]")
positive_int = number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "an integer of 0 or more")
positive_float = number(float, lambda v: v > 0, "a positive number")
non_negative_float = number(float, lambda v: v >= 0, "a number of 0 or more")


class Formatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so method names such as ``entropy-dynamic`` stay whole."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = " ".join(text.split())
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage text is one ``--help`` away)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


__all__ = ["EXIT_INTERRUPTED", "EXIT_RUNTIME", "EXIT_USAGE", "Formatter", "Parser", "items", "non_negative_float",
           "non_negative_int", "number", "positive_float", "positive_int", "rate", "read_text"]
