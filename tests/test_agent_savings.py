"""benchmarks/agent_savings.py: the prefix-cache pricing, the conversations it builds from the dev split, and a
replay through a real proxy with the tiny model."""

import gzip
import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from ctxpress.errors import InputError
from ctxpress.request import PromptRequest

from conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_savings.py"


def load_script():
    return load_benchmark("agent_savings")


bench = load_script()
OPENAI, ANTHROPIC = (next(t for t in bench.TERMS if t.name == name) for name in ("openai", "anthropic"))

FIRST = list(range(1500))
LONGER = FIRST + [7] * 300  # the next turn: the first request's prompt, then more
FORKED = FIRST[:1200] + [9] * 500  # the history rewritten from token 1200 on


def test_openai_bills_the_longest_shared_prefix_in_128_token_steps_at_half_price():
    first, longer, forked = bench.price([FIRST, LONGER, FORKED], OPENAI)
    assert (first.cached, first.cost) == (0, 1500)
    assert longer.cached == 1408  # 1500 shared tokens, counted in whole 128s
    assert longer.cost == 1800 - 1408 + 0.5 * 1408
    assert forked.cached == 1152 and forked.cost == 1700 - 1152 + 0.5 * 1152  # the prefix shared with either
    assert all(b.written == 0 for b in (first, longer, forked))  # writing is free


def test_openai_caches_nothing_below_1024_tokens():
    short = list(range(900))
    _, again = bench.price([short, short + [1] * 50], OPENAI)
    assert again.cached == 0 and again.cost == 950  # the second prompt is 950 tokens: too short to cache
    _, diverging = bench.price([FIRST, FIRST[:1000] + [5] * 600], OPENAI)
    assert diverging.cached == 0 and diverging.cost == 1600  # a 1000-token shared prefix is below the minimum


def test_anthropic_reads_whole_earlier_prompts_and_pays_for_writes():
    first, longer, forked = bench.price([FIRST, LONGER, FORKED], ANTHROPIC)
    assert (first.cached, first.written, first.cost) == (0, 1500, 1.25 * 1500)
    assert (longer.cached, longer.written) == (1500, 300)
    assert longer.cost == pytest.approx(0.1 * 1500 + 1.25 * 300)
    # no earlier prompt is a prefix of the rewritten one: it is written again in full
    assert (forked.cached, forked.written, forked.cost) == (0, 1700, 1.25 * 1700)
    below = list(range(800))
    small, grown = bench.price([below, below + [3] * 400], ANTHROPIC)
    assert (small.written, small.cost) == (0, 800)  # too short to be written
    assert (grown.cached, grown.written) == (0, 1200)


def test_bills_add_up():
    total = sum(bench.price([FIRST, LONGER], ANTHROPIC), bench.Bill())
    assert (total.tokens, total.cached, total.written) == (3300, 1500, 1800)


def test_prefixes_kept_compares_histories_byte_for_byte():
    a, b, c = ({"role": "user", "content": t} for t in ("one", "two", "three"))
    assert bench.prefixes_kept([[a], [a, b], [a, b, c]]) == 2
    rewritten = {"role": "user", "content": "one "}
    assert bench.prefixes_kept([[a], [a, b], [rewritten, b, c]]) == 1


def write_data(folder: Path, questions: int = 8, kv: int = 8) -> Path:
    """A data folder shaped like the real one: the first half of each file is the dev split."""
    nq = []
    for i in range(questions):
        answer = f"answer{i}"
        text = " ".join(f"Passage {i} sentence {j} tells of things in the record of year {1900 + j}." for j in range(6))
        nq.append({"question": f"what is the fact number {i}", "answers": [answer],
                   "ctxs": [{"title": f"Title {i}", "text": f"{text} The fact is {answer}. More text follows.",
                             "hasanswer": True, "isgold": True}]})
    records = []
    for i in range(kv):
        pairs = [[f"key-{i}-{j:02d}", f"value-{i}-{j:02d}"] for j in range(40)]
        records.append({"ordered_kv_records": pairs, "key": pairs[5][0], "value": pairs[5][1]})
    for name, rows in (("nq-open-oracle.dev.jsonl.gz", nq), ("kv-retrieval-75_keys.dev.jsonl.gz", records)):
        with gzip.open(folder / name, "wt", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def test_conversations_are_agent_turns_from_the_dev_split_with_valid_json(tmp_path):
    data = write_data(tmp_path)
    builder = bench.Builder(passages=3, pairs=10)
    built = builder.conversations(data, 3)
    assert built == builder.conversations(data, 3)  # the same settings, the same conversations
    everything = json.dumps(built)
    assert all(f"number {i}" not in everything for i in range(4, 8))  # the report split's questions: never
    for i, (name, messages) in enumerate(built):
        assert name == f"nq-{i}"
        assert messages[0] == {"role": "system", "content": bench.SYSTEM_PROMPT}
        assert messages[-1]["role"] == "assistant"
        follow_ups = [m for m in messages if m["role"] == "user"][1:]
        assert len(follow_ups) == 2 + i % 3
        calls = {c["id"]: c["function"] for m in messages for c in m.get("tool_calls") or []}
        results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
        assert set(calls) == set(results) and {f["name"] for f in calls.values()} >= {"fetch_records"}
        for call_id, function in calls.items():
            assert isinstance(json.loads(function["arguments"]), dict)
            if function["name"] == "fetch_records":
                stored = json.loads(results[call_id])
                assert len(stored) == 10 and stored[f"key-{i}-05"] == f"value-{i}-05"
        searched = [results[k] for k, f in calls.items() if f["name"] == "search"]
        passages = [json.loads(r) for r in searched if r.startswith("[")]
        first_user = next(m["content"] for m in messages if m["role"] == "user")
        if i % 2 == 0:  # the agent searched: JSON records, the gold passage among them
            assert first_user == f"What is the fact number {i}?"
            assert any(p["title"] == f"Title {i}" for p in passages[0])
            assert all(set(p) == {"title", "text"} for p in passages[0]) and len(passages[0]) == 3
        else:  # the passages came as text, the question last
            assert first_user.startswith("Document [1](Title: ") and first_user.endswith(f"number {i}?")
            assert f"Title {i}" in first_user


def test_conversations_beyond_the_dev_split_are_refused(tmp_path):
    with pytest.raises(InputError, match="between 1 and 4"):
        bench.Builder().conversations(write_data(tmp_path), 5)


def test_each_request_is_the_history_before_an_assistant_message(tmp_path):
    (_, messages), = bench.Builder(passages=3, pairs=10).conversations(write_data(tmp_path), 1)
    requests = bench.requests_of(messages)
    assert len(requests) == sum(m["role"] == "assistant" for m in messages)
    assert requests[-1] == messages[:-1] and requests[0] == messages[:2]  # the system prompt, the question
    assert all(later[: len(earlier)] == earlier for earlier, later in pairwise(requests))


def test_tokens_count_each_message_once_and_concatenate():
    calls = []

    def encode(text):
        calls.append(text)
        return [len(text)]

    tokens = bench.Tokens(encode)
    system, question = {"role": "system", "content": "be brief"}, {"role": "user", "content": "why?"}
    first, second = tokens.of([system]), tokens.of([system, question])
    assert second[: len(first)] == first and len(second) == len(first) + 1
    assert len(calls) == 3  # the tool definitions, the system prompt, the question: each encoded once
    called = bench.call("c1", "search", {"query": "x"})
    assert bench.rendered(called) == '<assistant>\n\nsearch({"query": "x"})'


def test_replay_through_the_proxy_prices_what_the_upstream_received(tiny_lm, tmp_path):
    built = bench.Builder(passages=3, pairs=10).conversations(write_data(tmp_path), 2)
    conversations = [messages for _, messages in built]
    proxied = bench.replay(tiny_lm, conversations, PromptRequest(rate=0.5))
    tokens = bench.Tokens(lambda text: tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    for messages, through in zip(conversations, proxied):
        requests = bench.requests_of(messages)
        assert [len(s.messages) for s in through] == [len(r) for r in requests]
        assert [m["role"] for m in through[-1].messages] == [m["role"] for m in requests[-1]]
        direct = bench.summary("c", "direct", [bench.Sent(r) for r in requests], tokens)
        proxy = bench.summary("c", "proxy", through, tokens)
        assert direct["prefix_kept"] == direct["transitions"] == len(requests) - 1
        assert proxy["input_tokens"] < direct["input_tokens"]  # the long system prompt, at least, is compressed
        assert proxy["seconds"] > 0 and direct["seconds"] == 0
        ids = [tokens.of(r) for r in requests]
        assert direct["anthropic_billed"] == round(sum(b.cost for b in bench.price(ids, ANTHROPIC)), 1)


def test_missing_data_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path), "--conversations", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("agent_savings: no evaluation data") and "--data-dir" in proc.stderr
