"""Summaries, tables and plots of a results file."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from ..errors import CtxpressError

MEASURES = ("score", "nll", "kl", "token_rate", "byte_rate", "prompt_seconds", "kv_compress_seconds",
            "prefill_seconds", "decode_tokens_per_second", "peak_memory_bytes")


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
                 "kv_method": first["kv_method"], "kv_ratio": first["kv_ratio"]}
        for measure in MEASURES:
            values = [m[measure] for m in members if m.get(measure) is not None]
            entry[measure] = statistics.fmean(values) if values else None
        entry["kept"] = entry["token_rate"] * entry["byte_rate"]  # fraction of the full cache kept overall
        summary.append(entry)
    return summary


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def overview(summary: list[dict]) -> str:
    """One row per configuration across tasks: each task's score, then NLL, KL and kept fraction averaged."""
    tasks = list(dict.fromkeys(s["task"] for s in summary))
    by_config: dict[str, dict[str, dict]] = defaultdict(dict)
    for s in summary:
        by_config[s["config"]][s["task"]] = s

    def mean(entries: list[dict], measure: str) -> float | None:
        values = [e[measure] for e in entries if e[measure] is not None]
        return statistics.fmean(values) if values else None

    out = ["| configuration | " + " | ".join(f"{t} score" for t in tasks) + " | gold NLL | KL vs full | kept |",
           "|---|" + "---:|" * (len(tasks) + 3)]
    for config, entries in by_config.items():
        scores = " | ".join(_fmt(entries[t]["score"], 2) if t in entries else "-" for t in tasks)
        rows = list(entries.values())
        out.append(f"| {config} | {scores} | {_fmt(mean(rows, 'nll'))} | {_fmt(mean(rows, 'kl'))} "
                   f"| {_fmt(mean(rows, 'kept'), 2)} |")
    return "\n".join(out) + "\n"


def markdown(summary: list[dict]) -> str:
    """An overview across tasks, then one table per task: quality first (score, NLL, KL), then cost."""
    out = ["### all tasks\n", overview(summary)]
    for task in dict.fromkeys(s["task"] for s in summary):
        out.append(f"### {task}\n")
        out.append("| configuration | n | score | gold NLL | KL vs full | tokens kept | cache bytes kept "
                   "| prompt s | KV compress s | prefill s | decode tok/s | process peak GiB |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in (s for s in summary if s["task"] == task):
            out.append(
                f"| {s['config']} | {s['examples']} | {_fmt(s['score'], 2)} | {_fmt(s['nll'])} | {_fmt(s['kl'])} "
                f"| {_fmt(s['token_rate'], 2)} | {_fmt(s['byte_rate'], 2)} | {_fmt(s['prompt_seconds'], 1)} "
                f"| {_fmt(s['kv_compress_seconds'], 2)} | {_fmt(s['prefill_seconds'], 2)} "
                f"| {_fmt(s['decode_tokens_per_second'], 1)} | {_fmt(s['peak_memory_bytes'] / 2**30, 2)} |")
        out.append("")
    return "\n".join(out)


def write(rows: list[dict], out: Path, plots: bool = True) -> list[dict]:
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    if plots:
        plot(rows, summary, out)
    return summary


def _method(entry: dict) -> str:
    if entry["family"] == "combined":
        return f"{entry['prompt_method']}+{entry['kv_method']}"
    return entry["prompt_method"] or entry["kv_method"]


def plot(rows: list[dict], summary: list[dict], out: Path) -> None:
    """score/NLL vs kept fraction per task; time and KV-cache size vs context length (niah).

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
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks) + 2, 8), squeeze=False)
    for col, task in enumerate(tasks):
        entries = [s for s in summary if s["task"] == task]
        for row, measure in enumerate(("score", "nll")):
            ax = axes[row][col]
            by_method: dict[str, list[dict]] = defaultdict(list)
            for s in entries:
                by_method[_method(s)].append(s)
            for method, points in by_method.items():
                points.sort(key=lambda s: s["kept"])
                marker = {"prompt": "o", "kv": "s", "combined": "^", "reference": "*"}[points[0]["family"]]
                ax.plot([p["kept"] for p in points], [p[measure] for p in points], marker=marker, label=method)
            ax.set_xlabel("fraction kept (prompt tokens x cache bytes)")
            ax.set_ylabel("task score" if measure == "score" else "gold-answer NLL (lower is better)")
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
