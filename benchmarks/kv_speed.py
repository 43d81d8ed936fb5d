"""KV-cache compression: stored bytes, compression time and decode speed per method.

For each context length (tokens of real text, the Paul Graham essays), each
method and each ratio, one fresh process prefills the context with the
embedded model, compresses its cache, and decodes a fixed number of tokens
(question-agnostic: the question comes after compression). Reported per run:

* stored bytes / dense bytes right after compression (target: <= ratio);
* compression seconds / prefill seconds (target: <= 0.3);
* decode tokens/s, and its ratio to ``full`` at the same length (target: >= 0.9);
* peak resident memory of the process during the run.

Decode speed on a shared CPU is noisy; each configuration runs ``--repeats``
times and the median is reported.

Usage: python benchmarks/kv_speed.py [--sizes 1024,2048,4096] [--ratios 0.5,0.2,0.1]
       [--methods ...] [--repeats 2] [--new-tokens 32] [--data-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, essays_text, markdown_table, run_child  # noqa: E402

METHODS = ["streaming", "h2o", "snapkv", "pyramidkv", "spindlekv"]
QUESTION = "What is the main argument of the text above?"


def child(method: str, ratio: float, tokens: int, new_tokens: int, data: Path) -> dict:
    from ctxpress import load_model
    from ctxpress.kv.generation import answer_questions

    lm = load_model("smollm2-135m", device="cpu")
    ids = lm.tokenizer(essays_text(data), add_special_tokens=False).input_ids
    context = lm.tokenizer.decode(ids[:tokens])
    answer_questions(lm, context[:200], [QUESTION], "full", max_new_tokens=2)  # warm-up
    options = {} if method == "full" else {"ratio": ratio}
    result = answer_questions(lm, context, [QUESTION], method, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, **options)[0]
    return result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--ratios", default="0.5,0.2,0.1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the raw numbers as JSON here")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        method, ratio, tokens, new, data = args.child
        print(json.dumps(child(method, float(ratio), int(tokens), int(new), Path(data))))
        return

    data = data_dir(args.data_dir)
    script = Path(__file__).resolve()
    runs: list[dict] = []
    rows = []
    configs = [("full", 1.0)] + [(m, float(r)) for r in args.ratios.split(",") for m in args.methods.split(",")]
    for size in [int(s) for s in args.sizes.split(",")]:
        results: dict[tuple[str, float], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeats):  # repeats interleave the configurations, spreading machine noise
            for method, ratio in configs:
                out = run_child(script, [method, str(ratio), str(size), str(args.new_tokens), str(data)])
                if "error" in out:
                    print(f"{size} {method} {ratio}: {out['error']}", file=sys.stderr)
                    continue
                results[(method, ratio)].append(out)
                runs.append({"tokens": size, "method": method, "ratio": ratio, **out})
        full_speed = statistics.median(r["decode_tokens_per_second"] for r in results[("full", 1.0)])
        for (method, ratio), outs in results.items():
            if not outs:
                continue
            med = {k: statistics.median(o[k] for o in outs) for k in
                   ("cache_bytes", "full_cache_bytes", "prefill_seconds", "compress_seconds",
                    "decode_tokens_per_second", "peak_memory_bytes")}
            rows.append([
                outs[0]["prompt_tokens"], method, "-" if method == "full" else ratio,
                f"{med['cache_bytes'] / med['full_cache_bytes']:.3f}",
                f"{med['prefill_seconds']:.2f}", f"{med['compress_seconds']:.2f}",
                f"{med['compress_seconds'] / med['prefill_seconds']:.2f}",
                f"{med['decode_tokens_per_second']:.1f}", f"{med['decode_tokens_per_second'] / full_speed:.2f}",
                f"{med['peak_memory_bytes'] / 2**30:.2f}",
            ])
        print(f"{size} tokens done", file=sys.stderr, flush=True)
    header = ["prompt tokens", "method", "ratio", "stored / dense", "prefill s", "compress s",
              "compress / prefill", "decode tok/s", "decode vs full", "peak GiB"]
    print(markdown_table(header, rows))
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
