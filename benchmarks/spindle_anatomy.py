"""Where SpindleKV's bytes go, layer by layer: what per-head selection costs and what codebooks save.

SpindleKV lets every query head keep its own tokens, but a KV group stores
the union of its heads' choices (one column per token any of them keeps);
its codebooks are meant to win that room back. For needles of the dev split
(the essay haystacks of the ``kv`` profile, 2k tokens) this script prefills
each needle once per setting, compresses with SpindleKV at ``--ratio``
(question-agnostic) and reports, averaged over needles and over layers in
three bands (first, middle and last third) and all layers:

* keep: tokens each query head keeps (calibrated so the bytes fit);
* union: columns a KV group stores over ``keep`` (1.0: the heads of a group
  chose the same tokens; the group size, 3 on SmolLM2: nothing in common);
* K coded / V coded: bytes of the layer's keys / values if coded, over their
  dense bytes, at the thresholds (a part is coded where this is below
  ``1 - min_saving``, 0.9 by default);
* coded parts: the fraction of K and V parts actually stored coded;
* seen: stored tokens a head attends to, over the context (what the bytes
  buy: an eviction press that keeps the same tokens for a whole KV group
  sees the ratio itself).

``--settings`` lists SpindleKV option sets to compare, each
``KEY=VALUE[:KEY=VALUE...]`` (``default`` for the paper's settings), e.g. its
thresholds against looser ones: ``default,theta_k=0.9:theta_v=0.9``.

Usage: python benchmarks/spindle_anatomy.py [--needles 3] [--ratio 0.2] [--settings default,...] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctxpress.errors import InputError

from common import data_dir, markdown_table


def recording_press(ratio: float, options: dict):
    """SpindleKV that remembers, per layer, the plan it calibrated and the tokens per head it chose."""
    from ctxpress.kv import SpindleKV

    class Recorded(SpindleKV):
        def calibrate(self, plans, n):
            counts = super().calibrate(plans, n)
            self.record = list(zip(plans, counts))
            return counts

    return Recorded(ratio=ratio, **options)


def anatomy(lm, examples, ratio: float, options: dict) -> list[dict]:
    """One dict per (needle, layer): keep, union, coded sizes over dense, coded flags, seen."""
    from ctxpress.chat import prompt_ids
    from ctxpress.kv import CompressedContext

    rows = []
    for example in examples:
        ids, _ = prompt_ids(lm.tokenizer, example.instruction + "\n\n" + example.context, example.question)
        press = recording_press(ratio, options)
        ctx = CompressedContext(lm, ids, press)
        n = ids.shape[1]
        for (plan, keep), layer in zip(press.record, ctx.cache.layers):
            columns = plan.width(keep)
            dense = plan.kv_heads * columns * plan.dim * plan.itemsize
            coded_k, coded_v = plan.coded_bytes(columns) if press.codebook else (dense, dense)
            _, layout = plan.layout(keep)
            rows.append({"layer": plan.layer.layer_idx, "keep": keep, "union": columns / keep,
                         "k": coded_k / dense, "v": coded_v / dense,
                         "coded": sum(part is not None for part in layout) / 2,
                         "seen": layer.store.attended_tokens() / n})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--needles", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--settings", default="default",
                        help="comma-separated SpindleKV option sets ('default': the paper's)")
    parser.add_argument("--data-dir")
    args = parser.parse_args()

    from ctxpress import load_model
    from ctxpress.bench.tasks import NeedleInHaystack
    from ctxpress.kv import press_with_budget
    from ctxpress.options import parse_options

    try:
        settings = [(spec, {} if spec == "default" else parse_options(spec.split(":")))
                    for spec in args.settings.split(",")]
        for spec, options in settings:  # a bad option fails here, before the model loads
            press = press_with_budget("spindlekv", args.ratio, None, options)
            if press.is_pyramidkv:
                raise InputError(f"{spec}: with neither per-head choice, codebooks nor adaptive budgets "
                                 "SpindleKV is PyramidKV, which has no plan to show")
    except InputError as exc:
        sys.exit(f"spindle_anatomy: {exc}")
    data = data_dir(args.data_dir)
    lm = load_model("smollm2-135m", device="cpu")
    examples = NeedleInHaystack(lengths=(2048,), depths=(0.1, 0.5, 0.9)).examples(
        data, args.needles, 0, lm.tokenizer, "dev")
    table = []
    for spec, options in settings:
        rows = anatomy(lm, examples, args.ratio, options)
        layers = 1 + max(r["layer"] for r in rows)
        bands = [("first third", 0, layers // 3), ("middle third", layers // 3, 2 * layers // 3),
                 ("last third", 2 * layers // 3, layers), ("all layers", 0, layers)]
        for band, lo, hi in bands:
            part = [r for r in rows if lo <= r["layer"] < hi]
            table.append([spec, band, *(f"{statistics.mean(r[key] for r in part):.{digits}f}"
                                        for key, digits in (("keep", 0), ("union", 2), ("k", 2), ("v", 2),
                                                            ("coded", 2), ("seen", 3)))])
        print(f"{spec} done", file=sys.stderr)
    print(f"SpindleKV at {args.ratio:g} of the bytes, {len(examples)} dev needles of 2048 tokens, question-agnostic\n")
    print(markdown_table(["settings", "layers", "keep", "union", "K coded / dense", "V coded / dense",
                          "coded parts", "seen"], table))


if __name__ == "__main__":
    main()
