"""The ``ctxpress`` command line.

Exit codes: 0 success, 1 the environment failed (model or package missing),
2 bad usage or input, 130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from . import __version__
from .errors import CtxpressError, InputError
from .guard import API_KEY_ENV, DEFAULT_MAX_QUEUE
from .models import DEFAULT_MODEL, EMBEDDED_MODELS
from .options import option_names, parse_options
from .prompt.methods import DEFAULT_METHOD, METHODS
from .proxy import DEFAULT_ROLES, DEFAULT_TIMEOUT, Policy, Upstream, parse_roles

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


def _items(text: str) -> list[str]:
    """The non-empty entries of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _number(cast: type, valid: Callable[[float], bool], rule: str) -> Callable[[str], float]:
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


_rate = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")
_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer of 0 or more")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number of 0 or more")


class _Formatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only, so method names such as ``entropy-dynamic`` stay whole."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = " ".join(text.split())
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage text is one ``--help`` away)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"embedded model ({', '.join(EMBEDDED_MODELS)}), local directory or hub id "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", dest="options",
                   help="method option, e.g. stages=4, alpha=0.5, fusion=multiplicative, consecutive=false, "
                        "seed=1, segment_tokens=50 (repeatable; each method's options and defaults are listed below)")


def _defaults(cls: type) -> str:
    """``stages=auto, consecutive=true, ...``: a method's options and their defaults, for the help."""
    def shown(value) -> str:
        if value is None or value is dataclasses.MISSING:
            return "auto" if value is None else "required"
        return str(value).lower() if isinstance(value, bool) else str(value)

    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    return ", ".join(f"{k}={shown(fields[k])}" for k in option_names(cls))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctxpress", description="Cheaper long-context LLM inference: prompt and KV-cache compression.")
    parser.add_argument("--version", action="version", version=f"ctxpress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    methods_help = "; ".join(f"{name}: {cls.description()} ({_defaults(cls)})" for name, cls in METHODS.items())
    c = sub.add_parser(
        "compress", help=f"compress a prompt ({DEFAULT_METHOD} by default)",
        description="Compress the text of FILE (or standard input) and print the compressed prompt.",
        epilog=f"Methods: {methods_help}.")
    c.add_argument("file", nargs="?", metavar="FILE", help="UTF-8 text file, or - for standard input")
    budget = c.add_mutually_exclusive_group(required=True)
    budget.add_argument("--rate", type=_rate, help="fraction of context tokens to keep, in (0, 1]")
    budget.add_argument("--target-tokens", type=_positive_int, metavar="N", help="context tokens to keep")
    c.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (default: {DEFAULT_METHOD})")
    c.add_argument("--question", default="", metavar="Q", help="question, kept whole after the context")
    c.add_argument("--instruction", default="", metavar="I", help="instruction, kept whole before the context")
    c.add_argument("--force-token", action="append", default=[], metavar="T", dest="force_tokens",
                   help="never drop tokens matching T: a literal, or [:newline:], [:digit:], [:punct:] "
                        "(repeatable)")
    _add_method_options(c)
    c.add_argument("--window", type=_positive_int, metavar="N",
                   help="tokens the compressor reads at once (default: the model's context length)")
    _add_model_options(c)
    out = c.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object with the result")
    out.add_argument("--stats", action="store_true", help="also print a summary line on stderr")
    c.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="never show the progress bar")
    c.set_defaults(handler=cmd_compress)

    from .kv import DEFAULT_METHOD as DEFAULT_KV
    from .kv import PRESSES

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
    kv_budget.add_argument("--kv-ratio", type=_rate, metavar="R",
                           help="fraction of the dense cache's bytes to keep (default 0.2)")
    kv_budget.add_argument("--kv-tokens", type=_positive_int, metavar="N", help="tokens kept per head and layer")
    g.add_argument("--kv-option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. window=64, per_head=false, codebook=false (repeatable)")
    g.add_argument("--question-aware", action="store_true",
                   help="include the question in the prefill that is compressed (one question only)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N", help="default 64")
    _add_model_options(g)
    g.add_argument("--json", action="store_true", help="print one JSON object per question")
    g.set_defaults(handler=cmd_generate)

    from .bench.catalog import TASKS
    from .bench.profiles import PROFILES
    from .bench.tasks import SPLITS

    b = sub.add_parser(
        "bench", help="evaluate prompt and KV methods on real tasks",
        description="Run every method of a profile on the evaluation tasks with the target model; write "
                    "per-example JSON lines, a summary (JSON and markdown) and plots to --out. Interrupted "
                    "runs resume where they stopped.")
    b.add_argument("--profile", default="quick", choices=PROFILES, help="grid and task sizes (default: quick)")
    b.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                   help=f"comma-separated subset of {', '.join(TASKS)}")
    b.add_argument("--examples", type=_positive_int, metavar="N", help="at most N examples per task (quick looks)")
    b.add_argument("--methods", metavar="LIST",
                   help="comma-separated subset of the profile's prompt and KV methods, each "
                   "optionally with options (dac-static:unit=word:alpha=0.5); the full-context "
                   "reference always runs")
    b.add_argument("--ratios", metavar="LIST",
                   help="comma-separated kept fractions in (0, 1] replacing the profile's prompt rates and KV "
                   "ratios (0.2 or 0.5,0.33)")
    b.add_argument("--settings", metavar="LIST",
                   help="comma-separated KV settings replacing the profile's: agnostic (question read after "
                   "compression), aware (question inside the compressed prefill)")
    b.add_argument("--split", default="report", choices=SPLITS,
                   help="dev: the first half of each data file, for tuning; report (default): the second half")
    b.add_argument("--out", metavar="DIR", help="output directory (default: bench-out/PROFILE)")
    b.add_argument("--data-dir", metavar="DIR", help="evaluation data (default: $CTXPRESS_DATA or ../shared/data)")
    b.add_argument("--seed", type=int, default=0, help="example construction seed (default 0)")
    b.add_argument("--fresh", action="store_true", help="discard earlier results in --out instead of resuming")
    b.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    b.add_argument("--report-only", action="store_true",
                   help="run nothing: rewrite the summary and plots from the results already in --out "
                   "(after runs with --no-plots, or several runs into one folder)")
    b.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="never show the progress bar")
    _add_model_options(b)
    b.set_defaults(handler=cmd_bench)

    v = sub.add_parser("serve", help="run the HTTP service (OpenAI-compatible chat, compression)",
                       description="Serve /v1/compress, /v1/chat/completions and /healthz; docs at /docs.")
    v.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    v.add_argument("--port", type=_positive_int, default=8000, help="default 8000")
    v.add_argument("--max-request-bytes", type=_positive_int, default=4 * 1024 * 1024, metavar="N",
                   help="largest request body accepted (default 4 MiB)")
    v.add_argument("--max-new-tokens", type=_positive_int, default=1024, metavar="N",
                   help="largest max_tokens a chat request may ask for (default 1024)")
    v.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every path but /healthz (default: "
                        f"${API_KEY_ENV}; prefer the variable, a flag's value is visible to other users)")
    v.add_argument("--max-queue", type=_non_negative_int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait for the model behind the one served; more get 429 with "
                        f"Retry-After (default {DEFAULT_MAX_QUEUE})")
    v.add_argument("--request-timeout", type=_non_negative_float, default=300.0, metavar="S",
                   help="seconds a request may take from arrival, waiting included, before it is answered 504 "
                        "(a stream ends with finish_reason length); 0: no limit (default 300)")
    v.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                   help="N model replicas behind the one endpoint, on Ray Serve (default 1: this process alone)")
    v.add_argument("--ray-address", metavar="ADDR",
                   help="with --replicas, the Ray cluster to run them on (default: start a local Ray)")
    v.add_argument("--threads", type=_positive_int, metavar="N",
                   help="with --replicas, torch threads (and Ray CPUs) per replica (default: this machine's "
                        "cores / N)")
    proxy = v.add_argument_group(
        "proxy", "with --upstream, chat and completions are forwarded to that OpenAI-compatible API after "
        "long messages are compressed; a request's prompt_compression field overrides these per request")
    proxy.add_argument("--upstream", metavar="URL",
                       help="base URL of the upstream API, as the openai client takes it (http://host:8001/v1)")
    proxy.add_argument("--upstream-key-env", default="OPENAI_API_KEY", metavar="NAME",
                       help="environment variable holding the upstream's key (default OPENAI_API_KEY; unset: "
                            "no Authorization header)")
    proxy.add_argument("--upstream-timeout", type=_positive_float, default=DEFAULT_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the upstream between bytes (default {DEFAULT_TIMEOUT:g}); "
                            "then 504")
    proxy_budget = proxy.add_mutually_exclusive_group()
    proxy_budget.add_argument("--rate", type=_rate, help="fraction of a long message's tokens kept (default 0.5)")
    proxy_budget.add_argument("--target-tokens", type=_positive_int, metavar="N",
                              help="tokens a compressed message keeps")
    proxy.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), metavar="METHOD",
                       help=f"prompt compression method (default {DEFAULT_METHOD})")
    _add_method_options(proxy)
    proxy.add_argument("--compress-roles", type=parse_roles, default=DEFAULT_ROLES, metavar="LIST",
                       help=f"roles whose messages are compressed (default {','.join(DEFAULT_ROLES)})")
    proxy.add_argument("--min-tokens", type=_non_negative_int, default=256, metavar="N",
                       help="messages of at most N tokens (a short question) are sent as they are (default 256)")
    _add_model_options(v)
    v.set_defaults(handler=cmd_serve)

    t = sub.add_parser("batch", help="compress a field of every line of a JSONL file",
                       description="Read IN.jsonl, compress FIELD of each line, write one result line per input "
                                   "line to OUT.jsonl. Re-running resumes after the lines already written.",
                       epilog=f"Methods: {methods_help}.")
    t.add_argument("source", metavar="IN.jsonl")
    t.add_argument("target", metavar="OUT.jsonl")
    t.add_argument("--field", required=True, help="the text field (dotted path for nested objects)")
    batch_budget = t.add_mutually_exclusive_group(required=True)
    batch_budget.add_argument("--rate", type=_rate, help="fraction of tokens to keep, in (0, 1]")
    batch_budget.add_argument("--target-tokens", type=_positive_int, metavar="N", help="tokens to keep")
    t.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS), metavar="METHOD",
                   help=f"default {DEFAULT_METHOD}")
    _add_method_options(t)
    t.add_argument("--workers", type=_positive_int, default=1, help="processes (or Ray actors); default 1")
    t.add_argument("--engine", choices=["local", "ray"], default="local", help="default local")
    t.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join (default: start a local Ray)")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="never show the progress bar")
    _add_model_options(t)
    t.set_defaults(handler=cmd_batch)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from .kv import press_with_budget
    from .kv.generation import answer_questions
    from .models import load_model

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


def cmd_compress(args: argparse.Namespace) -> int:
    from .prompt import PromptCompressor
    from .prompt.methods import build_method

    method = build_method(args.method, **parse_options(args.options))  # bad options fail before the model loads
    text = read_text(args.file)
    compressor = PromptCompressor(args.model, device=args.device, dtype=args.dtype,
                                  window_tokens=args.window, progress=args.progress)
    budget = {"rate": args.rate} if args.rate is not None else {"target_tokens": args.target_tokens}
    result = compressor.compress(text, method=method, question=args.question, instruction=args.instruction,
                                 force_tokens=args.force_tokens, **budget)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(result.compressed_prompt.rstrip("\n") + "\n")
        if args.stats:
            print(f"ctxpress: {args.method}: kept {result.compressed_tokens} of {result.origin_tokens} context "
                  f"tokens ({100 * result.rate:.1f}%) in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import report
    from .bench.catalog import TASKS
    from .bench.data import find_data_dir
    from .bench.profiles import profile
    from .bench.runner import RESULTS, Runner
    from .jsonl import read_records
    from .models import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown task {', '.join(unknown) or '(none)'} (choose from: {', '.join(TASKS)})")
    chosen = profile(args.profile)
    if args.methods is not None:
        chosen = chosen.only(_items(args.methods))
    if args.ratios is not None or args.settings is not None:
        chosen = chosen.at(ratios=None if args.ratios is None else _items(args.ratios),
                           settings=None if args.settings is None else _items(args.settings))
    out = Path(args.out or Path("bench-out") / args.profile)
    path = out / RESULTS
    if args.report_only:
        if args.fresh:
            raise InputError("--report-only reports the results in --out; --fresh would discard them")
        if not path.is_file():
            raise InputError(f"no results to report in {out} (no {RESULTS}); run the bench into it first")
    else:
        data = find_data_dir(args.data_dir, tasks)
        if args.fresh and path.exists():
            path.unlink()
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        Runner(lm, chosen, data, out, seed=args.seed, split=args.split, tasks=tasks, examples=args.examples,
               progress=args.progress).run()
    report.write(read_records(path), out, plots=args.plots)
    sys.stdout.write((out / "summary.md").read_text() + "\n")
    print(f"ctxpress: results in {out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .memory import map_large_blocks
    from .models import ensure_converted, load_model

    try:
        from .server import serve
    except ImportError as exc:
        raise CtxpressError(f"ctxpress serve needs {exc.name}: pip install 'ctxpress[serve]'") from None
    if args.api_key is not None and not args.api_key.strip():
        raise InputError(f"--api-key (or ${API_KEY_ENV}) is empty")
    forwarding = {}
    if args.upstream is not None:  # checked before the model loads
        forwarding["upstream"] = Upstream(args.upstream, os.environ.get(args.upstream_key_env) or None,
                                          args.upstream_timeout)
        budget = {"target_tokens": args.target_tokens, "rate": None} if args.target_tokens else {
            "rate": args.rate or 0.5}
        forwarding["policy"] = Policy(**budget, method=args.method, options=parse_options(args.options),
                                      roles=args.compress_roles, min_tokens=args.min_tokens)
    elif args.rate or args.target_tokens or args.options or args.method != DEFAULT_METHOD:
        raise InputError("--rate, --target-tokens, --method and --option configure the proxy: add --upstream URL "
                         "(the local chat endpoint takes prompt_compression per request)")
    app_options = dict(max_request_bytes=args.max_request_bytes, max_new_tokens=args.max_new_tokens,
                       api_key=args.api_key, max_queue=args.max_queue, request_timeout=args.request_timeout or None,
                       **forwarding)
    if args.replicas > 1:
        from .replicas import ReplicaSpec, default_threads, serve_replicas

        if args.model in EMBEDDED_MODELS:
            ensure_converted(args.model)  # once here, not once per replica
        spec = ReplicaSpec(args.model, args.device, args.dtype, args.threads or default_threads(args.replicas),
                           app_options)
        serve_replicas(spec, args.replicas, args.host, args.port, max_queue=args.max_queue,
                       ray_address=args.ray_address)
        return 0
    if args.ray_address or args.threads:
        raise InputError("--ray-address and --threads configure replicas: add --replicas N (N > 1)")
    map_large_blocks()  # a long-lived process: keep large tensors off the heap they would fragment
    serve(load_model(args.model, device=args.device, dtype=args.dtype), args.host, args.port, **app_options)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchJob, run
    from .prompt.methods import build_method

    options = parse_options(args.options)
    build_method(args.method, **options)  # one error now rather than one per line
    job = BatchJob(args.source, args.target, args.field, rate=args.rate, target_tokens=args.target_tokens,
                   method=args.method, options=options, model=args.model, device=args.device, dtype=args.dtype,
                   workers=args.workers, engine=args.engine, ray_address=args.ray_address)
    written = run(job, progress=args.progress)
    print(f"ctxpress: {written} lines written to {args.target}", file=sys.stderr)
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
