"""What each prompt method costs, in units of one plain forward pass over the same context.

For each context length (real text, the Paul Graham essays) and each method,
compresses to rate 0.5 ``--repeats`` times and divides the median time by the
median time of one plain forward pass (SDPA, no cache) over the same tokens,
measured in the same process and run. A method that reads the context once
costs about one unit plus its own overhead; staged ``dac`` reads it once per
stage. Quality per unit of cost: see the committed ``docs/results/prompt`` run.

Usage: python benchmarks/prompt_cost.py [--sizes 512,1024] [--methods dac-words,dac,...] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_dir, essays_text, markdown_table

METHODS = "dac-words,dac-static,entropy,llmlingua,dac"
RATE = 0.5


def median_seconds(fn, repeats: int, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    import torch

    from ctxpress import PromptCompressor, load_model

    torch.set_grad_enabled(False)
    lm = load_model("smollm2-135m", device="cpu")
    pc = PromptCompressor(lm, progress=False)
    ids = lm.tokenizer(essays_text(data_dir(args.data_dir)), add_special_tokens=False,
                       return_tensors="pt").input_ids[0]
    lm.model(ids[None, :16])  # warm-up
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        text = lm.tokenizer.decode(ids[:size])
        n = pc.count_tokens(text)
        context = torch.tensor([pc.tokenizer(text, add_special_tokens=False)["input_ids"]])
        plain = median_seconds(lm.model, args.repeats, input_ids=context, use_cache=False)
        for method in args.methods.split(","):
            seconds = median_seconds(pc.compress, args.repeats, text, rate=RATE, method=method)
            rows.append([n, method, f"{seconds:.2f}", f"{plain:.2f}", f"{seconds / plain:.1f}"])
            print(f"{n} tokens, {method}: {seconds:.2f} s ({seconds / plain:.1f} plain passes)",
                  file=sys.stderr, flush=True)
    print(markdown_table(["tokens", "method", "seconds", "plain pass s", "cost in plain passes"], rows))


if __name__ == "__main__":
    main()
