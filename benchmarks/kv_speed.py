"""KV-cache compression: stored bytes, compression time and decode speed per method.

For each context length (tokens of real text, the Paul Graham essays), each
method and each ratio, the embedded model prefills the context, compresses
its cache and decodes (question-agnostic: the question comes after
compression). Reported:

* stored bytes / dense bytes right after compression (target: <= ratio);
* compression seconds / prefill seconds (target: <= 0.3);
* decode tokens/s, and its ratio to ``full`` (target: >= 0.9);
* cached tokens a head attends to, as a fraction of the context (what the
  bytes buy: under SpindleKV a KV group stores the union of its heads'
  choices, and its codebooks win room back);
* peak resident memory of a process doing one such run.

A method may carry options, ``NAME:KEY=VALUE[:KEY=VALUE...]`` (the same
options as ``ctxpress generate --kv-option``), e.g.
``--methods spindlekv,spindlekv:min_saving=0`` to compare settings.

Bytes, times and memory come from one fresh process per run. Decode speed on
a shared CPU drifts over minutes, so it is measured separately: one process
per length and ratio prefills every method's cache, then decodes in rounds
that alternate between the methods, and reports medians over the rounds.

Usage: python benchmarks/kv_speed.py [--sizes 1024,2048,4096] [--ratios 0.5,0.2,0.1]
       [--methods ...] [--rounds 6] [--data-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctxpress.compat import with_cache
from ctxpress.errors import InputError

from common import data_dir, essays_text, markdown_table, press, run_child

METHODS = ["streaming", "h2o", "snapkv", "pyramidkv", "spindlekv"]
QUESTION = "What is the main argument of the text above?"
STEPS = 4  # decoding steps per method per round


def _context(lm, data: Path, tokens: int) -> str:
    ids = lm.tokenizer(essays_text(data), add_special_tokens=False).input_ids
    return lm.tokenizer.decode(ids[:tokens])


def run_one(method: str, ratio: float, tokens: int, data: Path) -> dict:
    """Prefill, compress and answer briefly in this (fresh) process."""
    from ctxpress import load_model
    from ctxpress.kv.generation import answer_questions

    lm = load_model("smollm2-135m", device="cpu")
    answer_questions(lm, "A short warm-up text.", [QUESTION], "full", max_new_tokens=2)
    result = answer_questions(lm, _context(lm, data, tokens), [QUESTION], press(method, ratio), max_new_tokens=8)[0]
    return result.to_dict()


def decode_rounds(methods: list[str], ratio: float, tokens: int, rounds: int, data: Path) -> dict:
    """Per method: decoding steps per second, alternating methods round by round, and the
    fraction of the context a head attends to."""
    import torch

    from ctxpress import load_model
    from ctxpress.chat import prompt_ids
    from ctxpress.kv import CompressedContext

    lm = load_model("smollm2-135m", device="cpu")
    context_ids, question_ids = prompt_ids(lm.tokenizer, _context(lm, data, tokens), QUESTION)
    state, attended = {}, {}
    for method in ["full", *methods]:
        ctx = CompressedContext(lm, context_ids, press(method, ratio))
        cache = ctx.cache.copy()
        attended[method] = cache.attended_tokens() / context_ids.shape[-1]
        with torch.no_grad():
            logits = lm.model(question_ids, **with_cache(lm.model, cache)).logits[:, -1:]
        state[method] = [cache, logits.argmax(-1)]
    steps: dict[str, list[float]] = {m: [] for m in state}
    with torch.no_grad():
        for _ in range(rounds):
            for method, (cache, token) in state.items():
                start = time.perf_counter()
                for _ in range(STEPS):
                    token = lm.model(token, **with_cache(lm.model, cache)).logits[:, -1:].argmax(-1)
                steps[method].append((time.perf_counter() - start) / STEPS)
                state[method][1] = token
    return {m: {"speed": 1 / statistics.median(s), "attended": attended[m]} for m, s in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,4096")
    parser.add_argument("--ratios", default="0.5,0.2,0.1")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the raw numbers as JSON here")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        if kind == "run":
            method, ratio, tokens, data = rest
            print(json.dumps(run_one(method, float(ratio), int(tokens), Path(data))))
        else:
            ratio, tokens, rounds, data, *methods = rest
            print(json.dumps(decode_rounds(methods, float(ratio), int(tokens), int(rounds), Path(data))))
        return

    data = data_dir(args.data_dir)
    script = Path(__file__).resolve()
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    for method in methods:  # a mistyped method or option fails here, not in every child
        try:
            press(method, ratios[0])
        except InputError as exc:
            sys.exit(f"benchmark: {method}: {exc}")
    raw, rows = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        full = run_child(script, ["run", "full", "1", str(size), str(data)])
        for ratio in ratios:
            decoded = run_child(script, ["decode", str(ratio), str(size), str(args.rounds), str(data), *methods])
            if "error" in decoded:
                print(f"{size} decode at {ratio}: {decoded['error']}", file=sys.stderr)
                continue
            speeds = {m: d["speed"] for m, d in decoded.items()}
            for method in ["full", *methods] if ratio == ratios[0] else methods:
                run = full if method == "full" else run_child(script, ["run", method, str(ratio), str(size),
                                                                      str(data)])
                if "error" in run:
                    print(f"{size} {method} {ratio}: {run['error']}", file=sys.stderr)
                    continue
                raw.append({"tokens": size, "method": method, "ratio": ratio, "run": run,
                            "decode_tokens_per_second": speeds[method], "full_decode": speeds["full"],
                            "attended_fraction": decoded[method]["attended"]})
                rows.append([
                    size, method, "-" if method == "full" else ratio,
                    f"{run['cache_bytes'] / run['full_cache_bytes']:.3f}",
                    f"{run['prefill_seconds']:.2f}", f"{run['compress_seconds']:.2f}",
                    f"{run['compress_seconds'] / run['prefill_seconds']:.2f}",
                    f"{speeds[method]:.1f}", f"{speeds[method] / speeds['full']:.2f}",
                    f"{decoded[method]['attended']:.3f}", f"{run['peak_memory_bytes'] / 2**30:.2f}",
                ])
        print(f"{size} tokens done", file=sys.stderr, flush=True)
    header = ["context tokens", "method", "ratio", "stored / dense", "prefill s", "compress s",
              "compress / prefill", "decode tok/s", "decode vs full", "kept / head", "peak GiB"]
    print(markdown_table(header, rows))
    if args.out:
        Path(args.out).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
