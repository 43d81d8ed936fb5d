"""DAC speed and memory against the naive computation and the plain forward passes.

For each context length (tokens of real text, the Paul Graham essays) it runs,
each in a fresh process:

* ``dac``   - ctxpress DAC at rate 0.5 (signals from the attention probe);
* ``naive`` - the same DAC, but every stage's signals computed the way the
  reference code does (``output_attentions=True``, all maps at once, full
  logits); skipped where the maps alone would not fit in memory;
* ``plain`` - plain forward passes (SDPA, as transformers runs the model)
  over exactly the sequences DAC scored: the lower bound for any
  implementation of the method.

Usage: python benchmarks/dac_speed.py [--sizes 512,1024,2048,4096,8192] [--data-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    available_bytes,
    data_dir,
    essays_text,
    markdown_table,
    peak_rss_bytes,
    rss_bytes,
    run_child,
)

RATE = 0.5


def reference_batched_signals(model, sequences, *, attention, batch_tokens, on_batch=None):
    """The reference code's way: one sequence at a time, every attention map kept."""
    from ctxpress.signals import reference_signals

    out = []
    for seq in sequences:
        out.append(reference_signals(model, seq))
        if on_batch:
            on_batch(len(seq))
    return out


def child(mode: str, tokens: int, data: Path, lengths: list[int]) -> dict:
    import torch

    from ctxpress import PromptCompressor, load_model
    from ctxpress.prompt.methods import build_method
    from ctxpress.signals import batched_signals

    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m", device="cpu")
    ids = lm.tokenizer(essays_text(data), add_special_tokens=False, return_tensors="pt").input_ids[0]
    lm.model(ids[None, :16])  # warm-up
    base_rss = rss_bytes()
    if mode == "plain":
        start = time.perf_counter()
        for n in lengths:
            lm.model(input_ids=ids[None, :n], use_cache=False)
        return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes(), "base_rss": base_rss}

    text = lm.tokenizer.decode(ids[:tokens])
    scored: list[int] = []

    def recording(fn):
        def wrapped(model, sequences, **kw):
            scored.extend(len(s) for s in sequences)
            return fn(model, sequences, **kw)
        return wrapped

    signal_fn = recording(batched_signals if mode == "dac" else reference_batched_signals)
    method = dataclasses.replace(build_method("dac"), signal_fn=signal_fn)
    result = PromptCompressor(lm, progress=False).compress(text, rate=RATE, method=method)
    return {"seconds": result.seconds, "peak_rss": peak_rss_bytes(), "base_rss": base_rss,
            "origin_tokens": result.origin_tokens, "compressed_tokens": result.compressed_tokens,
            "stages": result.settings["stages_run"], "lengths": scored}


def naive_map_bytes(n_tokens: int) -> int:
    """Memory of all attention maps of SmolLM2-135M (30 layers x 9 heads, fp32)."""
    return 30 * 9 * n_tokens * n_tokens * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192")
    parser.add_argument("--data-dir")
    parser.add_argument("--out", help="also write the raw numbers as JSON here")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        mode, tokens, data, lengths = args.child[0], int(args.child[1]), Path(args.child[2]), args.child[3:]
        print(json.dumps(child(mode, tokens, data, [int(x) for x in lengths])))
        return

    data = data_dir(args.data_dir)
    script = Path(__file__).resolve()
    rows, raw = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        dac = run_child(script, ["dac", str(size), str(data)])
        if "error" in dac:
            print(f"{size}: dac failed: {dac['error']}", file=sys.stderr)
            continue
        plain = run_child(script, ["plain", str(size), str(data), *map(str, dac["lengths"])])
        if naive_map_bytes(size) > 0.95 * available_bytes():
            naive = {"error": f"skipped: attention maps alone need {naive_map_bytes(size) / 2**30:.0f} GiB"}
        else:
            naive = run_child(script, ["naive", str(size), str(data)])
        raw.append({"tokens": size, "dac": dac, "naive": naive, "plain": plain})
        gib = 2**30
        naive_s = f"{naive['seconds']:.1f}" if "seconds" in naive else "n/a"
        speedup = f"{naive['seconds'] / dac['seconds']:.2f}x" if "seconds" in naive else "n/a"
        naive_mem = f"{naive['peak_rss'] / gib:.2f}" if "peak_rss" in naive else "n/a"
        rows.append([
            dac["origin_tokens"], dac["stages"], f"{dac['seconds']:.1f}", naive_s, f"{plain['seconds']:.1f}",
            speedup, f"{dac['seconds'] / plain['seconds']:.2f}x",
            f"{dac['peak_rss'] / gib:.2f}", naive_mem,
        ])
        print(f"{size} tokens done: dac {dac['seconds']:.1f}s, naive {naive_s}, plain {plain['seconds']:.1f}s",
              file=sys.stderr, flush=True)
    header = ["tokens", "stages", "DAC s", "naive s", "plain passes s", "naive / DAC", "DAC / plain",
              "DAC peak GiB", "naive peak GiB"]
    print(markdown_table(header, rows))
    skipped = [r for r in raw if "error" in r["naive"]]
    for r in skipped:
        print(f"\nnaive at {r['tokens']}: {r['naive']['error']}")
    if args.out:
        Path(args.out).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
