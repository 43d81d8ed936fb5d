"""KV-cache compression at scale: a large random-weight model on one accelerator.

The embedded 135M model on a CPU says little about where KV compression
matters: 8B-class models at tens of thousands of tokens on a GPU. This script
builds a model of a named shape with random weights (no download; bytes,
time and memory do not depend on the weights' values, quality would and is
not measured here), prefills random token ids, compresses the cache and
decodes. Per context length and method, in one process:

* stored bytes / dense bytes right after compression (target: <= ratio);
* prefill and compression seconds, and their ratio (target: <= 0.3);
* decode tokens/s and its ratio to ``full`` measured in the same run
  (target: >= 0.9), the median over rounds that alternate between methods;
* peak device memory from the prefill to the end of compression, and what
  the prefill and compression added to what was resident before them (the
  weights and the compressed caches of the methods before, held for the
  decode rounds); CUDA only (``kv_speed.py`` measures a CPU process's).

Presses over whole words are given words of 1-4 tokens drawn at random
(random ids spell no words). Each result is printed as a JSON line as soon
as it is measured, so a run stopped early keeps what it measured; the
markdown table follows at the end.

Usage: python benchmarks/kv_scale.py [--shape llama-8b|tiny] [--tokens 16384,32768]
       [--ratios 0.2] [--methods ...] [--steps 16] [--rounds 3] [--device cuda]
       [--dtype bfloat16] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctxpress.compat import with_cache
from ctxpress.errors import InputError

from common import markdown_table, press

METHODS = ["streaming", "snapkv", "pyramidkv", "spindlekv", "snapkv-words", "spindlekv-words",
           "snapkv-tiered", "quantized"]
# Model shapes (transformers LlamaConfig fields). llama-8b: Llama-3-8B's, 32 query and 8 KV heads.
SHAPES = {
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "rope_theta": 500000.0, "max_position_embeddings": 131072},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama of ``shape`` with random weights, created directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=False))
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def random_words(tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Word index of every token, for words of 1-4 tokens."""
    lengths = torch.randint(1, 5, (tokens,), generator=generator)
    starts = torch.zeros(tokens, dtype=torch.long)
    starts[lengths.cumsum(0)[lengths.cumsum(0) < tokens]] = 1
    return starts.cumsum(0)


def peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def prefill(model, method: str, ratio: float, ids: torch.Tensor, words: torch.Tensor) -> dict:
    """Prefill ``ids`` into ``method``'s cache and compress it: the cache, its next token and the numbers."""
    device = ids.device
    p = press(method, ratio)
    resident = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    cache = p.cache(model, None if p.needs_words() is None else words.to(device))
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache)).logits
    sync(device)
    total = time.perf_counter() - start
    peak = peak_bytes(device)
    return {"cache": cache, "token": logits[:, -1:].argmax(-1),
            "stored_bytes": cache.nbytes(), "dense_bytes": cache.dense_nbytes(),
            "prefill_seconds": total - cache.compress_seconds, "compress_seconds": cache.compress_seconds,
            "peak_bytes": peak, "peak_added_bytes": max(0, peak - resident)}


def decode_seconds(model, state: dict, steps: int) -> float:
    """Seconds per decoded token over ``steps`` greedy steps on ``state``'s cache."""
    device = state["token"].device
    token = state["token"]
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            token = model(token, **with_cache(model, state["cache"])).logits[:, -1:].argmax(-1)
    sync(device)
    state["token"] = token
    return (time.perf_counter() - start) / steps


def measure(model, tokens: int, ratio: float, methods: list[str], steps: int, rounds: int, emit) -> list[dict]:
    """Every method at one length and ratio; each result is passed to ``emit`` once measured."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=generator).to(device)
    words = random_words(tokens, generator)
    results, states = [], {}
    prefill(model, "full", ratio, ids, words)  # warm-up: the first prefill initialises the device's libraries
    for method in ["full", *methods]:
        state = prefill(model, method, ratio, ids, words)
        decode_seconds(model, state, 2)  # warm-up: the first steps allocate and compile
        # Only the compressed caches are kept for the decode rounds (the bytes they were made to save).
        states[method] = {"cache": state.pop("cache"), "token": state.pop("token")}
        results.append({"tokens": tokens, "method": method, "ratio": None if method == "full" else ratio,
                        **state})
    per_step: dict[str, list[float]] = {m: [] for m in states}
    for _ in range(rounds):
        for method, state in states.items():
            per_step[method].append(decode_seconds(model, state, steps))
    full_speed = 1 / statistics.median(per_step["full"])
    for result in results:
        speed = 1 / statistics.median(per_step[result["method"]])
        result.update(decode_tokens_per_second=speed, decode_vs_full=speed / full_speed)
        emit(result)
    return results


def row(r: dict) -> list:
    return [r["tokens"], r["method"], "-" if r["ratio"] is None else r["ratio"],
            f"{r['stored_bytes'] / r['dense_bytes']:.3f}", f"{r['dense_bytes'] / 2**30:.2f}",
            f"{r['prefill_seconds']:.2f}", f"{r['compress_seconds']:.2f}",
            f"{r['compress_seconds'] / r['prefill_seconds']:.2f}", f"{r['decode_tokens_per_second']:.1f}",
            f"{r['decode_vs_full']:.2f}", *(f"{r[k] / 2**30:.1f}" if r["peak_bytes"] else "-"  # CUDA only
                                              for k in ("peak_bytes", "peak_added_bytes"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--tokens", default="16384,32768", help="comma-separated context lengths")
    parser.add_argument("--ratios", default="0.2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out", help="also write the results as JSON lines here")
    args = parser.parse_args()
    methods = args.methods.split(",")
    ratios = [float(r) for r in args.ratios.split(",")]
    for method in methods:  # a mistyped method or option fails before the model is built
        try:
            press(method, ratios[0])
        except InputError as exc:
            sys.exit(f"benchmark: {method}: {exc}")
    device = torch.device(args.device)
    model = build_model(args.shape, device, getattr(torch, args.dtype))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.dtype}) "
          f"on {name}, torch {torch.__version__}", file=sys.stderr, flush=True)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 - written line by line

    def emit(result: dict) -> None:
        print(json.dumps(result), file=sys.stderr, flush=True)
        if out:
            out.write(json.dumps(result) + "\n")
            out.flush()

    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for ratio in ratios:
            rows += [row(r) for r in measure(model, tokens, ratio, methods, args.steps, args.rounds, emit)
                     if r["method"] != "full" or ratio == ratios[0]]
    header = ["context tokens", "method", "ratio", "stored / dense", "dense GiB", "prefill s", "compress s",
              "compress / prefill", "decode tok/s", "decode vs full", "peak GiB", "prefill adds GiB"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
