"""Summaries, tables and plots of a results file.

Every mean of a quality measure comes with its bootstrap 95% interval, and
methods are compared by paired differences over the same examples
(:mod:`ctxpress.bench.stats`): against the full context, and against every
configuration that competes at the same budget. A table says "A beats B"
only where the interval of their difference excludes zero.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import CtxpressError
from ..kv import FULL
from .profiles import Config
from .stats import HIGHER_IS_BETTER, MIN_PAIRED, Interval, bootstrap_mean, paired_difference, verdict

MEASURES = ("score", "survival", "nll", "kl", "token_rate", "byte_rate", "prompt_seconds", "kv_compress_seconds",
            "prefill_seconds", "decode_tokens_per_second", "peak_memory_bytes")
QUALITY = ("nll", "survival", "score", "kl")  # compared pairwise; the rest are costs
NAMES = {"nll": "gold NLL", "survival": "answer survival", "score": "task score", "kl": "KL vs full"}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean of every measure per (task, configuration), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["config"])].append(row)
    summary = []
    for (task, config), members in groups.items():
        first = members[0]
        entry = {"task": task, "config": config, "family": first["family"], "examples": len(members),
                 "prompt_method": first["prompt_method"], "prompt_rate": first["prompt_rate"],
                 "kv_method": first["kv_method"], "kv_ratio": first["kv_ratio"],
                 "kv_setting": first.get("kv_setting", "agnostic")}
        for measure in MEASURES:
            values = [m[measure] for m in members if m.get(measure) is not None]
            entry[measure] = statistics.fmean(values) if values else None
            if measure in QUALITY and values:
                ci = bootstrap_mean(values)
                entry[f"{measure}_ci"] = [ci.low, ci.high]
        entry["kept"] = entry["token_rate"] * entry["byte_rate"]  # fraction of the full cache kept overall
        summary.append(entry)
    return summary


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(entry: dict, measure: str, digits: int = 3) -> str:
    ci = entry.get(f"{measure}_ci")
    if entry.get(measure) is None or ci is None:
        return "-"
    return f"{entry[measure]:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _budget(row: dict) -> str:
    return Config(row["prompt_method"], row["prompt_rate"], row["kv_method"], row["kv_ratio"],
                  row.get("kv_setting", "agnostic")).budget


def comparisons(rows: list[dict]) -> list[dict]:
    """Paired differences (A minus B, per example) of every quality measure, per task: each
    configuration against ``full``, and each pair of configurations at the same budget."""
    values: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    budget: dict[str, str] = {}
    for row in rows:
        budget[row["config"]] = _budget(row)
        for measure in QUALITY:
            if row.get(measure) is not None:
                values[(row["task"], row["config"], measure)][row["example"]] = row[measure]
    out = []
    tasks = dict.fromkeys(r["task"] for r in rows)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    for task in tasks:
        for i, a in enumerate(configs):
            rivals = [b for b in configs[i + 1:] if budget[b] == budget[a]]
            if a != FULL:
                rivals.insert(0, FULL)
            for b in rivals:
                for measure in QUALITY:
                    d = paired_difference(values.get((task, a, measure), {}), values.get((task, b, measure), {}))
                    if d is None:
                        continue
                    out.append({"task": task, "a": a, "b": b, "budget": budget[a], "measure": measure,
                                "mean": d.mean, "low": d.low, "high": d.high, "n": d.n,
                                "verdict": verdict(d, measure)})
    return out


def _beats(comparisons_: list[dict]) -> list[str]:
    """'A beats B' lines, only where the interval excludes zero."""
    lines = []
    for c in comparisons_:
        if c["verdict"] == "tie" or c["measure"] == "kl":
            continue
        win, lose = (c["a"], c["b"]) if c["verdict"] == "better" else (c["b"], c["a"])
        d = Interval(c["mean"], c["low"], c["high"], c["n"])
        lines.append(f"- {c['task']}: **{win}** beats {lose} on {NAMES[c['measure']]}: "
                     f"{c['a']} - {c['b']} = {d} (n={c['n']})")
    return lines


def pairwise_tables(comparisons_: list[dict], task: str, measure: str) -> str:
    """One matrix per budget: row minus column, paired, with its interval; '+' row better, '-' row worse."""
    out = []
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in comparisons_:
        if c["task"] == task and c["measure"] == measure and c["b"] != FULL:
            groups[c["budget"]].append(c)
    for group, members in groups.items():
        configs = list(dict.fromkeys([m["a"] for m in members] + [m["b"] for m in members]))
        cell = {(m["a"], m["b"]): m for m in members}
        out.append(f"{NAMES[measure]}, {group} (row minus column, mean [95% interval]; "
                   f"{'higher' if HIGHER_IS_BETTER[measure] else 'lower'} is better; "
                   "+ the row is better, - worse, no mark: interval includes 0)\n")
        out.append("| | " + " | ".join(configs) + " |")
        out.append("|---|" + "---:|" * len(configs))
        for a in configs:
            cells = []
            for b in configs:
                c, sign = cell.get((a, b)), 1
                if c is None and (b, a) in cell:
                    c, sign = cell[(b, a)], -1
                if c is None:
                    cells.append("")
                    continue
                lo, hi = sorted((sign * c["low"], sign * c["high"]))
                mark = {"tie": "", "better": "+", "worse": "-"}[c["verdict"]] if sign == 1 else \
                    {"tie": "", "better": "-", "worse": "+"}[c["verdict"]]
                cells.append(f"{sign * c['mean'] + 0.0:+.3f} [{lo + 0.0:+.3f}, {hi + 0.0:+.3f}]{mark}")  # no -0.000
            out.append(f"| {a} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def overview(summary: list[dict]) -> str:
    """One row per configuration across tasks: each task's score, then NLL, survival, KL and kept fraction
    averaged over tasks."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for s in summary:
        by_config[s["config"]][s["task"]] = s

    def mean(entries: list[dict], measure: str) -> float | None:
        values = [e[measure] for e in entries if e.get(measure) is not None]  # older runs lack survival
        return statistics.fmean(values) if values else None

    out = ["| configuration | " + " | ".join(f"{t} score" for t in tasks)
           + " | gold NLL | answer survival | KL vs full | kept |",
           "|---|" + "---:|" * (len(tasks) + 4)]
    for config, entries in by_config.items():
        scores = " | ".join(_fmt(entries[t]["score"], 2) if t in entries else "-" for t in tasks)
        rows = list(entries.values())
        out.append(f"| {config} | {scores} | {_fmt(mean(rows, 'nll'))} | {_fmt(mean(rows, 'survival'), 2)} "
                   f"| {_fmt(mean(rows, 'kl'))} | {_fmt(mean(rows, 'kept'), 2)} |")
    return "\n".join(out) + "\n"


def markdown(summary: list[dict], comparisons_: list[dict] | None = None) -> str:
    """An overview across tasks, then per task: quality with intervals, differences against the full
    context, cost; then which differences are significant, and the pairwise matrices."""
    comparisons_ = comparisons_ or []
    vs_full = {(c["task"], c["a"], c["measure"]): c for c in comparisons_ if c["b"] == FULL}

    def delta(task: str, config: str, measure: str) -> str:
        c = vs_full.get((task, config, measure))
        return "-" if c is None else str(Interval(c["mean"], c["low"], c["high"], c["n"]))

    out = ["### all tasks\n", overview(summary)]
    for task in dict.fromkeys(s["task"] for s in summary):
        out.append(f"### {task}\n")
        out.append("Means with bootstrap 95% intervals; \"vs full\" is the paired difference from the full "
                   "context over the same examples.\n")
        out.append("| configuration | n | score | answer survival | gold NLL | NLL vs full | survival vs full "
                   "| KL vs full | tokens kept | cache bytes kept | prompt s | KV compress s | prefill s "
                   "| decode tok/s | process peak GiB |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in (s for s in summary if s["task"] == task):
            out.append(
                f"| {s['config']} | {s['examples']} | {_fmt_ci(s, 'score', 2)} | {_fmt_ci(s, 'survival', 2)} "
                f"| {_fmt_ci(s, 'nll')} | {delta(task, s['config'], 'nll')} "
                f"| {delta(task, s['config'], 'survival')} | {_fmt_ci(s, 'kl')} "
                f"| {_fmt(s['token_rate'], 2)} | {_fmt(s['byte_rate'], 2)} | {_fmt(s['prompt_seconds'], 2)} "
                f"| {_fmt(s['kv_compress_seconds'], 2)} | {_fmt(s['prefill_seconds'], 2)} "
                f"| {_fmt(s['decode_tokens_per_second'], 1)} | {_fmt(s['peak_memory_bytes'] / 2**30, 2)} |")
        out.append("")
        task_comparisons = [c for c in comparisons_ if c["task"] == task]
        beats = _beats(task_comparisons)
        out.append(f"Significant differences (95% interval of the paired difference excludes zero, "
                   f"at least {MIN_PAIRED} paired examples):\n")
        out.extend(beats or ["- none"])
        out.append("")
        for measure in ("nll", "survival", "score"):
            table = pairwise_tables(task_comparisons, task, measure)
            if table:
                out.append(table)
    return "\n".join(out)


def write(rows: list[dict], out: Path, plots: bool = True) -> list[dict]:
    summary = summarize(rows)
    paired = comparisons(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "comparisons.json").write_text(json.dumps(paired, indent=1))
    (out / "summary.md").write_text(markdown(summary, paired))
    if plots:
        plot(rows, summary, out)
    return summary


def _method(entry: dict) -> str:
    if entry["family"] == "combined":
        return f"{entry['prompt_method']}+{entry['kv_method']}"
    if entry["prompt_method"]:
        return entry["prompt_method"]
    return entry["kv_method"] + (" (question-aware)" if entry["kv_setting"] == "aware" else "")


def plot(rows: list[dict], summary: list[dict], out: Path) -> None:
    """score, survival and NLL (with 95% intervals) vs kept fraction per task; time and KV-cache size
    vs context length (niah).

    The cache size, not the process's resident memory, is plotted against length: in one long-running
    process the resident high-water mark mostly reflects the model and the runs before, while the
    cache is what a method actually changes (per-process peaks are in benchmarks/kv_speed.py).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise CtxpressError("plots need matplotlib: pip install 'ctxpress[bench]' (or pass --no-plots)") from exc
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.cm.tab20.colors)  # one colour per method
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    measures = ("score", "survival", "nll")
    fig, axes = plt.subplots(len(measures), len(tasks), figsize=(5 * len(tasks) + 2, 4 * len(measures)),
                             squeeze=False)
    for col, task in enumerate(tasks):
        entries = [s for s in summary if s["task"] == task]
        for row, measure in enumerate(measures):
            ax = axes[row][col]
            by_method: dict[str, list[dict]] = defaultdict(list)
            for s in entries:
                by_method[_method(s)].append(s)
            for method, points in by_method.items():
                points.sort(key=lambda s: s["kept"])
                marker = {"prompt": "o", "kv": "s", "combined": "^", "reference": "*"}[points[0]["family"]]
                points = [p for p in points if p[measure] is not None]  # runs older than a measure lack it
                if not points:
                    continue
                means = [p[measure] for p in points]
                bars = [[m - p.get(f"{measure}_ci", (m, m))[0] for m, p in zip(means, points)],
                        [p.get(f"{measure}_ci", (m, m))[1] - m for m, p in zip(means, points)]]
                ax.errorbar([p["kept"] for p in points], means, yerr=bars, marker=marker, capsize=3, label=method)
            ax.set_xlabel("fraction kept (prompt tokens x cache bytes)")
            ax.set_ylabel({"score": "task score", "survival": "answer survival (gold still in the context)",
                           "nll": "gold-answer NLL (lower is better)"}[measure] + ", 95% interval")
            ax.set_title(task)
            ax.grid(alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 1))
    fig.savefig(out / "quality_vs_compression.png", dpi=110)
    plt.close(fig)

    niah = [r for r in rows if r["task"] == "niah"]
    if not niah:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    series: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in niah:
        series[r["config"]][r["meta"]["length"]].append(r)
    for config, by_length in series.items():
        lengths = sorted(by_length)
        seconds = [statistics.fmean(r["prompt_seconds"] + r["kv_compress_seconds"] + r["prefill_seconds"]
                                    for r in by_length[n]) for n in lengths]
        memory = [statistics.fmean(r["cache_bytes"] for r in by_length[n]) / 2**20 for n in lengths]
        left.plot(lengths, seconds, marker="o", label=config)
        right.plot(lengths, memory, marker="o", label=config)
    left.set_xlabel("context tokens")
    left.set_ylabel("seconds: compression + prefill")
    right.set_xlabel("context tokens")
    right.set_ylabel("KV cache held after compression (MiB)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    fig.savefig(out / "time_memory_vs_length.png", dpi=110)
    plt.close(fig)
