"""``ctxpress generate``: answer questions about one long context from one compressed KV cache."""

from __future__ import annotations

import argparse
import json
import sys

from ..options import parse_options
from .common import positive_int, rate, read_text
from .groups import add_model_options


def register(sub: argparse._SubParsersAction) -> None:
    from ..kv import DEFAULT_METHOD as DEFAULT_KV
    from ..kv import DEFAULT_RATIO, PRESSES

    g = sub.add_parser(
        "generate", help="answer questions about a long context with a compressed KV cache",
        description="Prefill the context once, compress its KV cache, and answer each question from it "
                    "(greedy decoding with the local model).")
    g.add_argument("--context-file", required=True, metavar="F", help="UTF-8 text file, or - for standard input")
    g.add_argument("--question", required=True, action="append", metavar="Q",
                   help="question about the context (repeat to answer several from one compressed cache)")
    g.add_argument("--kv", default=DEFAULT_KV, choices=list(PRESSES), metavar="METHOD",
                   help=f"KV compression: {', '.join(PRESSES)} (default: {DEFAULT_KV})")
    kv_budget = g.add_mutually_exclusive_group()
    kv_budget.add_argument("--kv-ratio", type=rate, metavar="R",
                           help=f"fraction of the dense cache's bytes to keep (default {DEFAULT_RATIO:g})")
    kv_budget.add_argument("--kv-tokens", type=positive_int, metavar="N", help="tokens kept per head and layer")
    g.add_argument("--kv-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. window=64, per_head=false, codebook=false (repeatable)")
    g.add_argument("--question-aware", action="store_true",
                   help="include the question in the prefill that is compressed (one question only)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default 64")
    add_model_options(g)
    g.add_argument("--json", action="store_true", help="print one JSON object per question")
    g.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..kv import press_with_budget
    from ..kv.generation import answer_questions
    from ..models import load_model

    context = read_text(args.context_file)
    press = press_with_budget(args.kv, args.kv_ratio, args.kv_tokens, parse_options(args.kv_option))
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    results = answer_questions(lm, context, args.question, press, max_new_tokens=args.max_new_tokens,
                               question_aware=args.question_aware)
    for result in results:
        if args.json:
            json.dump(result.to_dict(), sys.stdout, ensure_ascii=False)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(result.answer + "\n")
    return 0


__all__ = ["register", "run"]
