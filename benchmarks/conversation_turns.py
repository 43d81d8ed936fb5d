"""What each turn of a growing conversation costs to compress, with the compressed-message cache and without.

An agent resends the whole conversation every turn. A six-turn chat is built
from the dev split of NQ: a system instruction; user turns that bring five
passages and a question; short follow-up questions; search tool calls whose
results are JSON passage records; the assistant's answers between them. Each
turn's request (all messages so far) goes through
:class:`~ctxpress.messages.Shrinker` with the embedded model and the
default policy, once with the cache and once without (a fresh shrinker with
``cache_size=0``). Printed per turn: messages sent, prompt tokens before and
after, messages compressed and compression seconds without and with the
cache, the cache's hits, and
whether the turn's compressed messages begin with the previous turn's,
byte for byte (what a provider's prefix cache needs).

    .venv/bin/python benchmarks/conversation_turns.py
"""

import argparse
import json
import sys
import time

from common import markdown_table


def passages_text(records: list[dict]) -> str:
    return "\n\n".join(f"Document [{k + 1}](Title: {r['ctxs'][0]['title']}) {r['ctxs'][0]['text']}"
                       for k, r in enumerate(records))


def search_result(records: list[dict]) -> str:
    return json.dumps([{"title": r["ctxs"][0]["title"], "text": r["ctxs"][0]["text"],
                        "url": "https://en.wikipedia.org/wiki/" + r["ctxs"][0]["title"].replace(" ", "_"),
                        "score": round(0.9 - 0.1 * k, 2)} for k, r in enumerate(records)])


def conversation(records: list[dict], documents: int) -> list[list[dict]]:
    """The requests of six turns, each the previous one plus that turn's new messages."""
    def group(k: int) -> list[dict]:
        return records[k * documents : (k + 1) * documents]

    def call(k: int, query: str) -> list[dict]:
        tool = {"id": f"call_{k}", "type": "function",
                "function": {"name": "search", "arguments": json.dumps({"query": query})}}
        return [{"role": "assistant", "content": None, "tool_calls": [tool]},
                {"role": "tool", "tool_call_id": f"call_{k}", "content": search_result(group(k))}]

    def answer(k: int) -> dict:
        return {"role": "assistant", "content": f"The answer is {group(k)[0]['answers'][0]}."}

    def asked(k: int) -> str:
        return group(k)[0]["question"].capitalize() + "?"

    new = [
        [{"role": "system", "content": "Answer the questions from the documents and the search results. "
                                       "Say which document you used."},
         {"role": "user", "content": f"{passages_text(group(0))}\n\n{asked(0)}"}],
        [answer(0), {"role": "user", "content": f"Thanks. Now search: {asked(1)}"}],
        [*call(1, asked(1)), answer(1), {"role": "user", "content": f"{passages_text(group(2))}\n\n{asked(2)}"}],
        [answer(2), {"role": "user", "content": f"And {asked(3)}"}, *call(3, asked(3))],
        [answer(3), {"role": "user", "content": f"{passages_text(group(4))}\n\n{asked(4)}"}],
        [answer(4), {"role": "user", "content": f"Last one: {asked(5)}"}, *call(5, asked(5))],
    ]
    requests, history = [], []
    for messages in new:
        history = history + messages
        requests.append(history)
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=5, help="passages per user turn or search (default 5)")
    parser.add_argument("--json-policy", default="keep", help="the policy's json field (default keep)")
    parser.add_argument("--data-dir", help="evaluation data (default: $CTXPRESS_DATA or ../shared/data)")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from ctxpress.bench.data import find_data_dir, load_nq
    from ctxpress.bench.tasks import split_indices
    from ctxpress.errors import InputError
    from ctxpress.messages import Shrinker, Tally
    from ctxpress.models import load_model
    from ctxpress.prompt import PromptCompressor
    from ctxpress.request import PromptRequest

    try:
        data = find_data_dir(args.data_dir, ["nq"])
        policy = PromptRequest(json=args.json_policy)
    except InputError as exc:
        sys.exit(f"conversation_turns: {exc}")
    records = load_nq(data)
    requests = conversation([records[i] for i in split_indices(len(records), "dev")], args.documents)
    compressor = PromptCompressor(load_model(args.model), progress=False)
    cached = Shrinker(compressor)

    rows, previous = [], []
    for turn, request in enumerate(requests, 1):
        fresh = Tally()
        start = time.perf_counter()
        Shrinker(compressor, cache_size=0).messages(request, policy, fresh)
        uncached = time.perf_counter() - start
        tally = Tally()
        start = time.perf_counter()
        sent = cached.messages(request, policy, tally)
        seconds = time.perf_counter() - start
        prefix = json.dumps(sent[: len(previous)]) == json.dumps(previous)
        rows.append([turn, len(request), tally.before, tally.after, fresh.compressed,
                     tally.compressed - tally.cache_hits, f"{uncached:.2f}", f"{seconds:.2f}", tally.cache_hits,
                     "yes" if prefix else "no"])
        previous = sent
    print(markdown_table(["turn", "messages", "tokens before", "tokens after", "compressed without cache",
                          "compressed with cache", "s without cache", "s with cache", "cache hits",
                          "previous turn is its prefix"], rows))
    print(json.dumps({"model": compressor.lm.name, "documents": args.documents, "json": policy.json,
                      "rows": rows}))


if __name__ == "__main__":
    main()
