"""Print the README's quality tables from a committed ``ctxpress bench`` results folder.

The README quotes means with bootstrap intervals and paired differences
against the method it recommends; this script reads them from the folder's
``summary.json`` and ``comparisons.json`` (written by ``ctxpress bench``), so
every number in those tables can be traced to a run and regenerated.

Usage:
  python benchmarks/results_tables.py prompt docs/results/prompt [--reference dac-words] [--rates 0.5,0.33]
  python benchmarks/results_tables.py kv docs/results/kv --task niah [--reference snapkv-tiered] [--ratios 0.2,0.1]
  python benchmarks/results_tables.py standing docs/results/kv [--reference snapkv-tiered] [--against snapkv,...]

A configuration's paired difference is "reference minus it", in **bold**
where the 95% interval excludes zero (marked * in the standing table). Only
examples that both rows have are paired; ``n`` is a row's example count (in
the standing table, the reference's). Bold and * follow the verdict of the
bench's own report, so fewer than MIN_PAIRED (10) paired examples decide
nothing: such a difference also says how many it paired, ``(n=2)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ctxpress.bench.stats import MIN_PAIRED

PROMPT_ORDER = ["dac-words", "dac-rag", "rag-passages", "dac", "dac-static", "entropy", "entropy-dynamic", "attention",
                "random", "llmlingua"]
KV_ORDER = ["snapkv-tiered", "snapkv:unit=word", "quantized", "snapkv", "pyramidkv", "spindlekv", "streaming"]


def load(folder: Path) -> tuple[list[dict], list[dict]]:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        comparisons = json.loads((folder / "comparisons.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        sys.exit(f"results_tables: {folder} holds no readable bench summary ({exc})")
    return summary, comparisons


def paired(comparisons: list[dict], task: str, a: str, b: str, measure: str) -> dict | None:
    """The bench's comparison of ``a`` with ``b`` on ``measure``, as ``a`` minus ``b`` (negated where it
    was stored the other way round); None if the two were not compared."""
    for c in comparisons:
        if c["task"] != task or c["measure"] != measure:
            continue
        if (c["a"], c["b"]) == (a, b):
            return c
        if (c["a"], c["b"]) == (b, a):
            return {**c, "mean": -c["mean"], "low": -c["high"], "high": -c["low"]}
    return None


def decided(c: dict) -> bool:
    """Whether the bench's report called a winner (its verdict: interval off zero, enough pairs)."""
    return c["verdict"] != "tie"


def difference(comparisons: list[dict], task: str, a: str, b: str, measure: str) -> str:
    """``a`` minus ``b`` on ``measure`` with its interval; bold where the report decided it; ``(n=K)``
    after it when fewer than MIN_PAIRED examples were paired; '-' if not compared."""
    c = paired(comparisons, task, a, b, measure)
    if c is None:
        return "-"
    text = f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
    if c["n"] < MIN_PAIRED:
        return f"{text} (n={c['n']})"
    return f"**{text}**" if decided(c) else text


def interval(entry: dict, measure: str, digits: int = 3) -> str:
    value, ci = entry.get(measure), entry.get(f"{measure}_ci")
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def ordered(summary: list[dict], task: str, labels: list[str]) -> list[dict]:
    by = {s["config"]: s for s in summary if s["task"] == task}
    return [by[label] for label in labels if label in by]


def prompt_tables(summary: list[dict], comparisons: list[dict], reference: str, rates: list[str]) -> str:
    out = []
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    for task in tasks:
        configs = [s["config"] for s in summary if s["task"] == task]
        out.append(f"\n#### {task}\n")
        out.append(f"| configuration | n | gold NLL | NLL vs full | answer survival | score | prompt s "
                   f"| {reference} minus it: NLL | {reference} minus it: survival |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        labels = ["full"]
        for rate in rates:
            ref = f"{reference}@{rate}"
            named = [f"{m}@{rate}" for m in PROMPT_ORDER]
            variants = [c for c in configs if c.endswith(f"@{rate}") and c not in named]
            labels += [ref] + [c for c in named + variants if c != ref]
        for s in ordered(summary, task, labels):
            config = s["config"]
            rate = config.rpartition("@")[2]
            ref = f"{reference}@{rate}"
            is_ref = config == ref
            name = f"**{config}**" if is_ref else config
            vs_full = "-" if config == "full" else difference(comparisons, task, config, "full", "nll")
            against = ["-", "-"] if config == "full" or is_ref else [
                difference(comparisons, task, ref, config, m) for m in ("nll", "survival")]
            out.append(f"| {name} | {s['examples']} | {interval(s, 'nll')} | {vs_full} | {interval(s, 'survival', 2)} "
                       f"| {s['score']:.2f} | {s['prompt_seconds']:.1f} | {against[0]} | {against[1]} |")
    return "\n".join(out)


def kv_tables(summary: list[dict], comparisons: list[dict], task: str, reference: str, ratios: list[str]) -> str:
    out = []
    configs = [s["config"] for s in summary if s["task"] == task]
    for ratio in ratios:
        for setting, suffix in (("question-aware", ":aware"), ("question-agnostic", "")):
            ref = f"kv:{reference}@{ratio}{suffix}"
            if ref not in configs:
                continue
            named = [f"kv:{m}@{ratio}{suffix}" for m in KV_ORDER]
            others = [c for c in configs if c.startswith("kv:") and c.endswith(f"@{ratio}{suffix}")
                      and c not in named]
            rows = ordered(summary, task, ["full", *named, *others])
            out.append(f"\n#### {task}, {setting}, {float(ratio):.0%} of the bytes\n")
            out.append(f"| configuration | n | score | gold NLL | KL vs full | bytes kept | {reference} minus it: NLL "
                       f"| {reference} minus it: KL | decode tok/s |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for s in rows:
                config = s["config"]
                is_ref = config == ref
                against = ["-", "-"] if is_ref else [
                    difference(comparisons, task, ref, config, m) for m in ("nll", "kl")]
                if config == "full":
                    against[1] = "-"
                name = f"**{config}**" if is_ref else config
                out.append(f"| {name} | {s['examples']} | {s['score']:.2f} | {interval(s, 'nll')} "
                           f"| {interval(s, 'kl')} | {s['byte_rate']:.2f} | {against[0]} | {against[1]} "
                           f"| {s['decode_tokens_per_second']:.1f} |")
    return "\n".join(out)


def standing(summary: list[dict], comparisons: list[dict], reference: str, against: list[str],
             ratios: list[str]) -> str:
    """One line per task, setting and ratio: the reference minus each of ``against`` (and the full
    cache) on gold NLL and KL, paired, so where it wins, ties or loses shows at a glance."""
    configs = {(s["task"], s["config"]) for s in summary}

    def cell(task: str, ref: str, other: str) -> str:
        if (task, other) not in configs:
            return "not run"
        parts, few = [], ""
        for measure in ("nll", "kl") if other != "full" else ("nll",):
            c = paired(comparisons, task, ref, other, measure)
            if c is None:
                parts.append("-")
                continue
            parts.append(f"{c['mean']:+.3f}" + ("*" if decided(c) else ""))
            few = f" (n={c['n']})" if c["n"] < MIN_PAIRED else ""
        return " / ".join(parts) + few

    out = [f"| task | setting | bytes | n | {reference} minus full: NLL | "
           + " | ".join(f"minus {m}: NLL / KL" for m in against) + " |",
           "|---|---|---:|---:|---:|" + "---:|" * len(against)]
    for task in dict.fromkeys(s["task"] for s in summary):
        for ratio in ratios:
            for setting, suffix in (("aware", ":aware"), ("agnostic", "")):
                ref = f"kv:{reference}@{ratio}{suffix}"
                row = next((s for s in summary if s["task"] == task and s["config"] == ref), None)
                if row is None:
                    continue
                cells = [cell(task, ref, f"kv:{m}@{ratio}{suffix}") for m in against]
                out.append(f"| {task} | {setting} | {float(ratio):.0%} | {row['examples']} "
                           f"| {cell(task, ref, 'full')} | " + " | ".join(cells) + " |")
    out.append(f"\n{reference} minus the method, paired over the examples both have; * where the 95% bootstrap "
               f"interval excludes zero; fewer than {MIN_PAIRED} pairs, (n=K), decide nothing; negative: the "
               "reference has the lower NLL (or KL).")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("family", choices=("prompt", "kv", "standing"),
                        help="prompt or kv: per-task tables; standing: the KV reference against the "
                             "baselines at every task, setting and ratio, one line each")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--reference", help="the configuration the others are compared with "
                                            "(default: dac-words for prompt, snapkv-tiered for kv)")
    parser.add_argument("--rates", default="0.5,0.33", help="prompt rates, in order")
    parser.add_argument("--ratios", default="0.2,0.1,0.5", help="KV ratios, in order")
    parser.add_argument("--task", default="niah", help="the KV task to tabulate")
    parser.add_argument("--against", default="snapkv,pyramidkv,streaming,quantized,spindlekv",
                        help="standing: the methods the reference is compared with")
    args = parser.parse_args()
    summary, comparisons = load(args.folder)
    if args.family == "prompt":
        text = prompt_tables(summary, comparisons, args.reference or "dac-words", args.rates.split(","))
    elif args.family == "standing":
        text = standing(summary, comparisons, args.reference or "snapkv-tiered", args.against.split(","),
                        args.ratios.split(","))
    else:
        text = kv_tables(summary, comparisons, args.task, args.reference or "snapkv-tiered", args.ratios.split(","))
    print(text.strip() or f"results_tables: nothing to tabulate in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
