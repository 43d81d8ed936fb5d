"""Record what the compressors produce on fixed inputs, and compare two records bit for bit.

For restructurings that must not change behaviour: record with the old code,
record with the new, compare. A record holds, for a fixed set of KV presses
and options on fixed prompts (tiny random-weight models with GQA and plain
multi-head attention, and the embedded model on a real essay), the cache
bytes after the prefill and after decoding, and every logit of a greedy
generation; and for a fixed set of prompt methods, options and inputs, the
kept token indices and the compressed text. A case that refuses its input
records the error message, which must not change either.

Usage:
  python benchmarks/equivalence.py record OUT.pt [--no-embedded] [--data-dir ../shared/data]
  python benchmarks/equivalence.py compare OLD.pt NEW.pt

Record the old code from a second checkout: ``git worktree add /tmp/old HEAD``,
then ``PYTHONPATH=/tmp/old/src python benchmarks/equivalence.py record old.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models the tests build

# (method, options) of every KV case: each press, its budgets and its storage options.
KV_CASES: list[tuple[str, dict]] = [
    ("full", {}),
    ("streaming", {"ratio": 0.2}),
    ("h2o", {"ratio": 0.2}),
    ("snapkv", {"ratio": 0.5}),
    ("snapkv", {"ratio": 0.2}),
    ("snapkv", {"ratio": 0.1}),
    ("snapkv", {"tokens": 40}),
    ("snapkv", {"ratio": 0.2, "bits": 8}),
    ("snapkv", {"ratio": 0.2, "bits": 4, "group": 16}),
    ("snapkv", {"ratio": 0.2, "rest_bits": 4}),
    ("snapkv", {"ratio": 0.3, "bits": 8, "rest_bits": 4}),
    ("snapkv", {"ratio": 0.001}),
    ("snapkv-words", {"ratio": 0.2}),
    ("snapkv-words", {"ratio": 0.1, "unit_score": "mean"}),
    ("snapkv-tiered", {"ratio": 0.5}),
    ("snapkv-tiered", {"ratio": 0.2}),
    ("snapkv-tiered", {"ratio": 0.15}),
    ("snapkv-tiered", {"ratio": 0.1}),
    ("snapkv-tiered", {"ratio": 0.02}),
    ("snapkv-tiered", {"ratio": 0.2, "bits": 8}),
    ("pyramidkv", {"ratio": 0.2}),
    ("pyramidkv", {"ratio": 0.1, "beta": 0.2}),
    ("spindlekv", {"ratio": 0.2}),
    ("spindlekv", {"ratio": 0.5}),
    ("spindlekv", {"tokens": 30}),
    ("spindlekv", {"evict": False}),
    ("spindlekv", {"ratio": 0.2, "per_head": False}),
    ("spindlekv", {"ratio": 0.2, "codebook": False, "head_masks": False}),
    ("spindlekv", {"ratio": 0.2, "codebook": False, "bits": 8}),
    ("spindlekv", {"ratio": 0.2, "adaptive": True}),
    ("spindlekv", {"ratio": 0.001}),
    ("spindlekv-words", {"ratio": 0.2}),
    ("spindlekv-words", {"ratio": 0.1, "bits": 8}),
    ("quantized", {"bits": 4}),
    ("quantized", {"ratio": 0.2}),
    ("quantized", {"ratio": 0.1}),
    ("quantized", {"ratio": 0.05}),
]

# (method, compress keywords) of every prompt case, run on each prompt input.
PROMPT_CASES: list[tuple[str, dict]] = [
    ("dac-words", {"rate": 0.5}),
    ("dac-words", {"rate": 0.33, "question": "QUESTION"}),
    ("dac-words", {"target_tokens": 60, "force_tokens": ["[:digit:]"]}),
    ("dac-words", {"rate": 0.5, "question": "QUESTION", "attention_from": "question"}),
    ("dac", {"rate": 0.5}),
    ("dac-static", {"rate": 0.33}),
    ("entropy", {"rate": 0.5, "unit": "word"}),
    ("entropy-dynamic", {"rate": 0.5}),
    ("attention", {"rate": 0.33}),
    ("random", {"rate": 0.5, "unit": "phrase"}),
    ("llmlingua", {"rate": 0.5}),
]


def _essay(tokens: int, tokenizer, data_dir: Path) -> str:
    """The first ``tokens`` tokens' worth of the first essay of the shared data (or a fixed text)."""
    folder = data_dir / "pg-essays"
    files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
    text = files[0].read_text() if files else " ".join(["The committee met on 12 May 2024 in Oslo."] * 200)
    ids = tokenizer(text).input_ids[:tokens]
    return tokenizer.decode(ids)


def kv_record(name: str, model, tokenizer, ids: torch.Tensor, out: dict) -> None:
    from ctxpress.compat import with_cache
    from ctxpress.errors import InputError
    from ctxpress.kv import build_press, cache_nbytes
    from ctxpress.words import token_words

    for method, options in KV_CASES:
        key = f"kv/{name}/{method}/{sorted(options.items())}"
        try:
            press = build_press(method, **options)
            punctuation = press.needs_words()
            units = None if punctuation is None else token_words(tokenizer, ids[0].tolist(), punctuation)
            cache = press.cache(model, units) if units is not None else press.cache(model)
            with torch.no_grad():
                gen = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False,
                                     pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            out[key] = {"tokens": gen.sequences[0, ids.shape[1]:].clone(),
                        "logits": torch.stack([x[0] for x in gen.logits]).clone(),
                        "bytes_after": cache_nbytes(cache)}
        except InputError as exc:
            out[key] = {"error": str(exc)}
        print(key, "error" if "error" in out[key] else out[key]["bytes_after"], flush=True)


def prompt_record(name: str, lm, text: str, question: str, out: dict) -> None:
    from ctxpress import InputError, PromptCompressor

    pc = PromptCompressor(lm, progress=False)
    for method, kwargs in PROMPT_CASES:
        kwargs = {k: (question if v == "QUESTION" else v) for k, v in kwargs.items()}
        key = f"prompt/{name}/{method}/{sorted(kwargs.items())}"
        try:
            r = pc.compress(text, method=method, **kwargs)
            out[key] = {"kept": list(r.kept_token_indices), "text": r.compressed_prompt}
        except InputError as exc:
            out[key] = {"error": str(exc)}
        print(key, "error" if "error" in out[key] else len(out[key]["kept"]), flush=True)


def record(path: Path, embedded: bool, data_dir: Path) -> None:
    from ctxpress.models import LoadedModel

    from conftest import TEXT, make_model, make_tokenizer

    torch.use_deterministic_algorithms(True)
    out: dict = {}
    tokenizer = make_tokenizer()
    for name, kv_heads, seed in (("tiny-gqa", 2, 0), ("tiny-mha", 4, 1)):
        model = make_model(len(tokenizer), kv_heads=kv_heads, seed=seed)
        torch.manual_seed(0)
        ids = torch.randint(1, len(tokenizer), (1, 160))
        kv_record(name, model, tokenizer, ids, out)
        lm = LoadedModel(name, model, tokenizer)
        prompt_record(name, lm, TEXT * 3, "Which numbers matter?", out)
    if embedded:
        from ctxpress.models import load_model

        lm = load_model("smollm2-135m", device="cpu")
        text = _essay(400, lm.tokenizer, data_dir)
        kv_record("smollm2", lm.model, lm.tokenizer, lm.tokenizer(text, return_tensors="pt").input_ids, out)
        prompt_record("smollm2", lm, text, "What did the author learn?", out)
    torch.save(out, path)
    print(f"{len(out)} cases -> {path}")


def compare(old_path: Path, new_path: Path) -> int:
    old, new = torch.load(old_path), torch.load(new_path)
    differ = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None or a.keys() != b.keys():
            differ.append(key)
            continue
        for field, value in a.items():
            other = b[field]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            if not same:
                differ.append(f"{key} [{field}]")
    errors = sum("error" in v for v in old.values())
    print(f"{len(old)} cases ({errors} refusals), {len(differ)} differ")
    for line in differ:
        print("  differs:", line)
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run every case and save what it produced")
    rec.add_argument("out", type=Path)
    rec.add_argument("--no-embedded", action="store_true", help="tiny random-weight models only")
    rec.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                     help="where pg-essays/ lies (default ../shared/data; without it a fixed text is used)")
    cmp = sub.add_parser("compare", help="compare two records bit for bit (exit 1 if any case differs)")
    cmp.add_argument("old", type=Path)
    cmp.add_argument("new", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, not args.no_embedded, args.data_dir)
        return 0
    return compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
