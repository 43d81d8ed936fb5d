"""The ``ctxpress`` command line: the parser of every command, and ``main``.

Exit codes: 0 success, 1 the environment failed (model or package missing),
2 bad usage or input, 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import CtxpressError, InputError
from . import batch, bench, compress, generate, serve
from .common import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, Parser

COMMANDS = (compress, generate, bench, serve, batch)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ctxpress", description="Cheaper long-context LLM inference: prompt and KV-cache compression.")
    parser.add_argument("--version", action="version", version=f"ctxpress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors, --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"ctxpress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtxpressError as exc:
        print(f"ctxpress: error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        print("ctxpress: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


__all__ = ["build_parser", "main"]
