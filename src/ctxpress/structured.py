"""Message text that must stay valid: JSON and code, found and kept usable.

Dropping tokens from prose loses a little meaning; dropping them from JSON
or code leaves something that no longer parses or runs, which an agent then
reads as broken data. :mod:`ctxpress.messages` asks this module three
things about a text:

* :func:`parse_json`: is the whole text a JSON object or array? (Then it is
  kept byte-identical, or only its long string values are shortened, by
  :func:`shorten_values`, so the result parses and has the same keys.)
* :func:`fenced_spans`: where are its fenced code blocks (````` or ``~~~``,
  any language, ```` ```json ```` included)? They are kept whole while the
  prose around them is compressed.
* :func:`looks_like_code`: is a tool's result source code? A heuristic,
  deliberately simple: at least :data:`CODE_MIN_LINES` non-blank lines, of
  which at least :data:`CODE_LINE_SHARE` look like code (indented, ending in
  a bracket, ``;`` or ``:``, starting with a keyword of a common language or
  carrying an operator prose does not use). Wrapped prose, lists and
  passages fall well below the share; Python, JavaScript, SQL and shell
  output such as tracebacks fall above it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

CODE_MIN_LINES = 3
CODE_LINE_SHARE = 0.6

_FENCE_LINE = re.compile(r"[ ]{0,3}(`{3,}|~{3,})(.*)")  # a fence may be indented up to three spaces
_KEYWORDS = (
    # Python, JavaScript/TypeScript, C-family, Go, Rust, shell: lower case, as the languages spell them
    "def", "class", "import", "from", "return", "elif", "else", "try", "except", "finally", "raise", "yield",
    "async", "await", "const", "let", "var", "function", "export", "public", "private", "protected", "static",
    "package", "using", "namespace", "fn", "func", "impl", "struct", "enum", "interface", "pub", "use",
    "#include", "#define", "echo", "fi", "done", "then",
    # SQL, upper case as it is usually written
    "SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "ALTER", "DROP", "WITH", "FROM", "WHERE", "JOIN",
    "LEFT", "INNER", "GROUP", "ORDER", "HAVING", "LIMIT", "VALUES", "SET", "AND", "OR", "UNION",
)
_KEYWORD = "|".join(map(re.escape, _KEYWORDS))
_CODE_START = re.compile(rf"(?:{_KEYWORD})(?=[\s(:;{{]|$)|@\w|(?://|/\*|\*/|--)\s")  # a decorator, a comment
_CODE_END = ("{", "}", "[", "]", "(", ")", ";", ":", "=>", "\\")  # not ",": wrapped prose ends so
_OPERATORS = re.compile(r"==|!=|=>|->|&&|\|\||::|\+=|\w\(\)|\)\s*\{|^\s*[\w.\[\]'\"]+\s*=\s*\S")


class _RepeatedKey(ValueError):
    pass


REPEATED_KEYS = object()  # parse_json's answer for JSON that has an object with a key twice


def parse_json(text: str) -> object | None:
    """The JSON object or array ``text`` holds (surrounding whitespace allowed), else None.

    Bare strings and numbers are left to the prose rules: they are text to
    compress, not structure to keep. JSON with an object that repeats a key
    gives :data:`REPEATED_KEYS`: it is JSON to keep as it is, since writing
    it again would drop all but one of the repeated keys.
    """
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[" or stripped[-1] not in "}]":
        return None
    try:
        return json.loads(stripped, object_pairs_hook=_unique_keys)
    except _RepeatedKey:
        return REPEATED_KEYS
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _RepeatedKey
    return value


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each fenced code block in ``text``, from its opening fence to its closing one.

    A block closes at a fence of the same character, at least as long, with
    nothing after it; a block never closed runs to the end of the text (as
    Markdown reads it), so an unfinished block is kept too.
    """
    spans, opened, fence, at = [], -1, "", 0
    for line in text.split("\n"):
        match = _FENCE_LINE.match(line)
        if match and opened < 0:
            opened, fence = at, match.group(1)
        elif (match and opened >= 0 and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence)
              and not match.group(2).strip()):
            spans.append((opened, at + len(line)))
            opened = -1
        at += len(line) + 1
    if opened >= 0:
        spans.append((opened, len(text)))
    return spans


def _code_like(line: str) -> bool:
    stripped = line.strip()
    indented = line[:1] in (" ", "\t") and not stripped.startswith(("- ", "* ", "+ "))  # not a nested list item
    return (indented or stripped.endswith(_CODE_END) or bool(_CODE_START.match(stripped))
            or bool(_OPERATORS.search(stripped)))


def looks_like_code(text: str) -> bool:
    """Whether ``text`` reads as source code rather than prose (the rule is in the module's docstring)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < CODE_MIN_LINES:
        return False
    return sum(map(_code_like, lines)) >= CODE_LINE_SHARE * len(lines)


def shorten_values(value: object, shorten: Callable[[str], str | None]) -> object:
    """``value`` with each string value replaced by ``shorten(s)`` where that is not None.

    Keys, numbers, booleans and null are never touched, nor is the nesting:
    the result has exactly the structure of ``value``.
    """
    if isinstance(value, dict):
        return {key: shorten_values(item, shorten) for key, item in value.items()}
    if isinstance(value, list):
        return [shorten_values(item, shorten) for item in value]
    if isinstance(value, str):
        shorter = shorten(value)
        return value if shorter is None else shorter
    return value


def string_values(value: object) -> list[str]:
    """Every string value in ``value`` (keys excluded), in document order."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in string_values(item)]
    if isinstance(value, list):
        return [s for item in value for s in string_values(item)]
    return [value] if isinstance(value, str) else []


def compact(value: object) -> str:
    """``value`` as JSON without optional whitespace (non-ASCII written as is, which costs fewer tokens)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


__all__ = ["CODE_LINE_SHARE", "CODE_MIN_LINES", "REPEATED_KEYS", "compact", "fenced_spans", "looks_like_code",
           "parse_json", "shorten_values", "string_values"]
