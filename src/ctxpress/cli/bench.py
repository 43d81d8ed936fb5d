"""``ctxpress bench``: every method of a profile on the evaluation tasks, with a summary and plots."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .common import items, positive_int
from .groups import add_model_options, add_no_progress


def register(sub: argparse._SubParsersAction) -> None:
    from ..bench.catalog import TASKS
    from ..bench.profiles import PROFILES
    from ..bench.tasks import SPLITS

    b = sub.add_parser(
        "bench", help="evaluate prompt and KV methods on real tasks",
        description="Run every method of a profile on the evaluation tasks with the target model; write "
                    "per-example JSON lines, a summary (JSON and markdown) and plots to --out. Interrupted "
                    "runs resume where they stopped.")
    b.add_argument("--profile", default="quick", choices=PROFILES, help="grid and task sizes (default: quick)")
    b.add_argument("--tasks", default=",".join(TASKS), metavar="LIST",
                   help=f"comma-separated subset of {', '.join(TASKS)}")
    b.add_argument("--examples", type=positive_int, metavar="N", help="at most N examples per task (quick looks)")
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
    add_no_progress(b)
    add_model_options(b)
    b.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench import report
    from ..bench.catalog import TASKS
    from ..bench.data import find_data_dir
    from ..bench.profiles import profile
    from ..bench.runner import RESULTS, Runner
    from ..jsonl import read_records
    from ..models import load_model

    tasks = items(args.tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise InputError(f"unknown task {', '.join(unknown) or '(none)'} (choose from: {', '.join(TASKS)})")
    chosen = profile(args.profile)
    if args.methods is not None:
        chosen = chosen.only(items(args.methods))
    if args.ratios is not None or args.settings is not None:
        chosen = chosen.at(ratios=None if args.ratios is None else items(args.ratios),
                           settings=None if args.settings is None else items(args.settings))
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


__all__ = ["register", "run"]
