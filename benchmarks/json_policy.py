"""Which JSON policy to default to: what each saves on realistic tool results, and what it loses.

Two kinds of tool result built from the dev split, sent as a ``tool``
message through :class:`~ctxpress.messages.Shrinker` with the embedded
model at one rate:

* search: a JSON list of passage records (``title``, ``text``, ``url``,
  ``score``), an NQ question's gold passage among passages of other
  questions, as a search tool returns them (``json.dumps`` defaults);
* kv: a JSON object of UUID keys and values (the key-value retrieval data).

Policies: ``keep`` (byte-identical), ``values`` (long prose values
compressed, keys and the rest kept, written compactly), and two references
that are not policies: ``truncate`` (each value ``values`` would compress
cut to its first ``rate`` share of tokens instead) and ``prose`` (the whole
JSON text compressed as prose: what the proxy did before; slow on the long
key-value objects, so run on the first ``--prose-examples`` results only). Printed per kind
and policy: tokens before and after (the compressor's tokenizer), the
fraction saved, how many results still parse with the same keys and
non-string values, whether the gold answer (search) or the asked value (kv)
still reaches the upstream, and seconds per result.

    .venv/bin/python benchmarks/json_policy.py --examples 20
"""

import argparse
import json
import sys
import time

from common import markdown_table


def search_results(records: list[dict], count: int, documents: int) -> list[tuple[str, list[str]]]:
    """(tool result, gold answers) per question: the gold passage among the next questions' passages."""
    from ctxpress.bench.metrics import normalize_answer

    out = []
    for i in range(count):
        record = records[i]
        answers = [normalize_answer(a) for a in record["answers"]]
        others = [r["ctxs"][0] for r in records[i + 1 :] + records[:i]
                  if not any(a and a in normalize_answer(r["ctxs"][0]["text"]) for a in answers)]
        passages = others[: documents - 1]
        passages.insert(i % documents, record["ctxs"][0])
        results = [{"title": p["title"], "text": p["text"],
                    "url": "https://en.wikipedia.org/wiki/" + p["title"].replace(" ", "_"),
                    "score": round(0.92 - 0.07 * k, 2)} for k, p in enumerate(passages)]
        out.append((json.dumps(results), list(record["answers"])))
    return out


def kv_results(records: list[dict], count: int) -> list[tuple[str, list[str]]]:
    """(tool result, asked value) per example: its key-value records as one JSON object."""
    return [(json.dumps(dict(map(tuple, record["ordered_kv_records"]))), [record["value"]])
            for record in records[:count]]


def same_shape(sent: str, original: str) -> bool:
    """Whether ``sent`` parses into ``original``'s keys, nesting and non-string values."""
    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [shape(item) for item in value]
        return None if isinstance(value, str) else value

    try:
        return shape(json.loads(sent)) == shape(json.loads(original))
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20, help="tool results per kind (default 20)")
    parser.add_argument("--prose-examples", type=int, default=3,
                        help="results per kind compressed as prose, the slow reference (default 3)")
    parser.add_argument("--rate", type=float, default=0.5, help="kept fraction (default 0.5)")
    parser.add_argument("--documents", type=int, default=5, help="passages per search result (default 5)")
    parser.add_argument("--data-dir", help="evaluation data (default: $CTXPRESS_DATA or ../shared/data)")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from ctxpress.bench.data import find_data_dir, load_kv, load_nq
    from ctxpress.bench.metrics import answer_survives
    from ctxpress.bench.stats import bootstrap_mean
    from ctxpress.bench.tasks import split_indices
    from ctxpress.errors import InputError
    from ctxpress.messages import Shrinker, Tally
    from ctxpress.models import load_model
    from ctxpress.prompt import PromptCompressor
    from ctxpress.request import PromptRequest
    from ctxpress.structured import compact, parse_json, shorten_values, string_values

    try:
        data = find_data_dir(args.data_dir, ["nq", "kv-retrieval"])
    except InputError as exc:
        sys.exit(f"json_policy: {exc}")
    nq, kv = load_nq(data), load_kv(data)
    kinds = {"search": search_results([nq[i] for i in split_indices(len(nq), "dev")], args.examples,
                                      args.documents),
             "kv": kv_results([kv[i] for i in split_indices(len(kv), "dev")], args.examples)}
    compressor = PromptCompressor(load_model(args.model), progress=False)
    shrinker = Shrinker(compressor, cache_size=0)  # every result compressed, so the seconds are real
    keep_policy = PromptRequest(rate=args.rate, json="keep")
    values_policy = PromptRequest(rate=args.rate, json="values")
    count, tokenizer = compressor.count_tokens, compressor.tokenizer

    def truncated(text: str) -> str:
        """What ``values`` sends, each value it would compress cut to its first tokens instead."""
        structure, cut = parse_json(text), {}
        for value in shrinker.prose_values(structure, values_policy):
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            cut[value] = tokenizer.decode(ids[: max(1, round(args.rate * len(ids)))])
        return compact(shorten_values(structure, cut.get))

    senders = {
        "keep": lambda text: shrinker.text(text, keep_policy, Tally(), eligible=True, tool=True),
        "values": lambda text: shrinker.text(text, values_policy, Tally(), eligible=True, tool=True),
        "truncate": truncated,
        "prose": lambda text: compressor.compress(text, rate=args.rate).compressed_text,
    }
    rows = []
    for kind, results in kinds.items():
        for name, send in senders.items():
            before = after = valid = 0
            survived, seconds = [], 0.0
            for text, answers in results[: args.prose_examples] if name == "prose" else results:
                start = time.perf_counter()
                sent = send(text)
                seconds += time.perf_counter() - start
                before, after = before + count(text), after + count(sent)
                valid += same_shape(sent, text)
                readable = " ".join(string_values(json.loads(sent))) if same_shape(sent, text) else sent
                survived.append(answer_survives(readable, answers) if kind == "search"
                                else float(any(a in readable for a in answers)))
            kept = bootstrap_mean(survived)
            rows.append([kind, name, len(survived), before, after, f"{1 - after / before:.2f}",
                         f"{valid}/{len(survived)}", f"{kept.mean:.2f} [{kept.low:.2f}, {kept.high:.2f}]",
                         f"{seconds / len(results):.2f}"])
    print(markdown_table(["tool result", "policy", "results", "tokens before", "tokens after", "saved",
                          "parses, same keys", "answer survives", "s per result"], rows))
    print(json.dumps({"model": compressor.lm.name, "rate": args.rate, "documents": args.documents, "rows": rows}))


if __name__ == "__main__":
    main()
