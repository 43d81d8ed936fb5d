"""``ctxpress batch``: one field of every line of a JSONL file, compressed, resumable."""

from __future__ import annotations

import argparse
import sys

from ..prompt.methods import DEFAULT_METHOD
from ..request import PromptRequest
from .common import positive_int
from .groups import add_budget, add_method, add_method_options, add_model_options, add_no_progress, methods_epilog


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("batch", help="compress a field of every line of a JSONL file",
                       description="Read IN.jsonl, compress FIELD of each line, write one result line per input "
                                   "line to OUT.jsonl. Re-running resumes after the lines already written.",
                       epilog=methods_epilog())
    t.add_argument("source", metavar="IN.jsonl")
    t.add_argument("target", metavar="OUT.jsonl")
    t.add_argument("--field", required=True, help="the text field (dotted path for nested objects)")
    add_budget(t, required=True, rate_help="fraction of tokens to keep, in (0, 1]", tokens_help="tokens to keep")
    add_method(t, f"default {DEFAULT_METHOD}")
    add_method_options(t)
    t.add_argument("--workers", type=positive_int, default=1, help="processes (or Ray actors); default 1")
    t.add_argument("--engine", choices=["local", "ray"], default="local", help="default local")
    t.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local Ray)")
    add_no_progress(t)
    add_model_options(t)
    t.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..batch import BatchJob
    from ..batch import run as run_job

    request = PromptRequest.from_args(args)  # one error now rather than one per line
    job = BatchJob(args.source, args.target, args.field, rate=request.rate, target_tokens=request.target_tokens,
                   method=request.method, options=dict(request.options), model=args.model, device=args.device,
                   dtype=args.dtype, workers=args.workers, engine=args.engine, ray_address=args.ray_address)
    written = run_job(job, progress=args.progress)
    print(f"ctxpress: {written} lines written to {args.target}", file=sys.stderr)
    return 0


__all__ = ["register", "run"]
