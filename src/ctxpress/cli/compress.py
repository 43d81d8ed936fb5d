"""``ctxpress compress``: one prompt, compressed and printed."""

from __future__ import annotations

import argparse
import json
import sys

from ..prompt.methods import DEFAULT_METHOD, METHODS
from ..request import PromptRequest
from .common import positive_int, read_text
from .groups import add_budget, add_method, add_method_options, add_model_options, add_no_progress, methods_epilog


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compress", help=f"compress a prompt ({DEFAULT_METHOD} by default)",
        description="Compress the text of FILE (or standard input) and print the compressed prompt.",
        epilog=methods_epilog())
    c.add_argument("file", nargs="?", metavar="FILE", help="UTF-8 text file, or - for standard input")
    add_budget(c, required=True, rate_help="fraction of context tokens to keep, in (0, 1]",
               tokens_help="context tokens to keep")
    add_method(c, f"one of {', '.join(METHODS)} (default: {DEFAULT_METHOD})")
    c.add_argument("--question", default="", metavar="Q", help="question, kept whole after the context")
    c.add_argument("--instruction", default="", metavar="I", help="instruction, kept whole before the context")
    c.add_argument("--force-token", action="append", default=[], metavar="T", dest="force_tokens",
                   help="never drop tokens matching T: a literal, or [:newline:], [:digit:], [:punct:] "
                        "(repeatable)")
    add_method_options(c)
    c.add_argument("--window", type=positive_int, metavar="N",
                   help="tokens the compressor reads at once (default: the model's context length)")
    add_model_options(c)
    out = c.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object with the result")
    out.add_argument("--stats", action="store_true", help="also print a summary line on stderr")
    add_no_progress(c)
    c.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..prompt import PromptCompressor

    request = PromptRequest.from_args(args)  # bad options fail before the model loads
    text = read_text(args.file)
    compressor = PromptCompressor(args.model, device=args.device, dtype=args.dtype,
                                  window_tokens=args.window, progress=args.progress)
    result = request.compress(compressor, text)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.compressed_prompt.rstrip("\n") + "\n")
        if args.stats:
            print(f"ctxpress: {args.method}: kept {result.compressed_tokens} of {result.origin_tokens} context "
                  f"tokens ({100 * result.rate:.1f}%) in {result.seconds:.1f} s", file=sys.stderr)
    return 0


__all__ = ["register", "run"]
