"""What the compressing proxy saves on multi-turn agent conversations, priced with provider prefix caching.

Tokens saved are not money saved: an agent resends its whole history every
turn, and providers bill a prefix they have seen before at a fraction of the
price. A proxy that rewrites the history differently from one turn to the
next loses that discount and can cost more than no proxy at all. This
script prices both.

Conversations are built from the dev split of the evaluation data (never the
report split): a fixed system prompt of agent instructions, an NQ question
answered either with a ``search`` tool call whose result is a JSON array of
``{"title", "text"}`` records (gold passage and distractors) or with the
passages pasted as text into the user's message, the answer, then 2-4
follow-up turns (a ``fetch_records`` call whose result is a JSON object of
key-value records, a quote, a second search). Every model call of the agent
(each point where an assistant message comes next) is one request carrying
the whole history. Each request goes through a real ``ctxpress serve
--upstream`` app (the embedded model compressing) to a stand-in upstream that
records what it receives; "direct" is the same requests without the proxy.

Billing is in units of the uncached input price per token, input only (the
replies are the same either way), under two published sets of terms (see
:data:`TERMS`). Tokens are counted by the compressor's tokenizer: a
provider's tokenizer counts differently, but both sides are counted alike,
so the ratio holds. Also printed: how many turns' history, as the upstream
received it, was a byte-identical prefix of the next request's, the
condition for every provider's prefix cache.

    .venv/bin/python benchmarks/agent_savings.py --conversations 10 --rate 0.5
"""

import argparse
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import pairwise
from pathlib import Path

from ctxpress.bench.data import find_data_dir, load_kv, load_nq
from ctxpress.bench.metrics import normalize_answer
from ctxpress.bench.tasks import split_indices
from ctxpress.errors import InputError


@dataclass(frozen=True)
class Terms:
    """A provider's published prompt-caching terms; prices are fractions of its uncached input price."""

    name: str
    minimum: int  # tokens: a shorter prompt (prefix, with breakpoints) is never cached
    increment: int  # a cached prefix counts in whole multiples of this many tokens
    read: float  # price of a token read from the cache
    write: float  # price of a token written to the cache (1.0: writing is free)
    breakpoints: bool  # True: only an earlier request's whole prompt is cached (its last message a breakpoint)
    source: str


TERMS = (
    # Automatic caching of prompts of 1,024 tokens or more, hits in 128-token increments; gpt-4o:
    # $2.50 per million input tokens, $1.25 cached.
    Terms("openai", 1024, 128, 0.5, 1.0, False,
          "https://platform.openai.com/docs/guides/prompt-caching, https://openai.com/api/pricing (gpt-4o)"),
    # Prefixes up to a cache_control breakpoint (here on each request's last message, as agents do), at
    # least 1,024 tokens (Sonnet, Opus); 5-minute cache writes 1.25x the base input price, reads 0.1x.
    Terms("anthropic", 1024, 1, 0.1, 1.25, True,
          "https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching (Claude Sonnet)"),
)


@dataclass
class Bill:
    """What one request (or a sum of them) is billed for its input."""

    tokens: int = 0
    cached: int = 0  # read from the cache
    written: int = 0  # written to the cache at a surcharge
    cost: float = 0.0  # in uncached input tokens

    def __add__(self, other: "Bill") -> "Bill":
        return Bill(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def price(requests: Sequence[Sequence[int]], terms: Terms) -> list[Bill]:
    """The bill of each request of one conversation, in order, every earlier request's prefix still cached.

    OpenAI's cache serves the longest prefix shared with any earlier prompt;
    Anthropic's only a whole earlier prompt (the prefix up to its breakpoint),
    and writes what this prompt adds, at a surcharge.
    """
    bills = []
    for k, tokens in enumerate(requests):
        size = len(tokens)
        if size < terms.minimum:
            bills.append(Bill(size, 0, 0, float(size)))
            continue
        earlier = [e for e in requests[:k] if len(e) >= terms.minimum]
        if terms.breakpoints:
            cached = max((len(e) for e in earlier if list(tokens[: len(e)]) == list(e)), default=0)
        else:
            cached = max((common_prefix(tokens, e) for e in earlier), default=0)
        cached = cached - cached % terms.increment if cached >= terms.minimum else 0
        written = size - cached if terms.write != 1.0 else 0
        cost = (size - cached - written) + terms.read * cached + terms.write * written
        bills.append(Bill(size, cached, written, cost))
    return bills


def prefixes_kept(sent: Sequence[Sequence[dict]]) -> int:
    """How many requests' messages, byte for byte, begin the next request's messages."""

    def raw(messages: Sequence[dict]) -> list[str]:
        return [json.dumps(m, ensure_ascii=False) for m in messages]

    return sum(raw(b[: len(a)]) == raw(a) for a, b in pairwise(sent))


# --- the conversations ------------------------------------------------------------------------

SYSTEM_PROMPT = """You are a research assistant working for an analyst. You answer questions about facts, people, \
places, dates and records, and you have two tools.

Tools:
- search(query, top_k): searches an encyclopedia and returns the top_k passages, each with its title and text. \
Call it whenever a question asks for a fact you are not certain of; one call per question is usually enough. \
Write the query as a plain question or a few keywords.
- fetch_records(collection, limit): returns up to limit records of a collection as a JSON object that maps \
each record's key to its value. Call it when the analyst asks about a stored key.

How to answer:
1. Read every passage or record a tool returns before you answer. Some passages are irrelevant to the \
question; ignore those rather than guessing from them.
2. Answer from the tool results only. If they do not contain the answer, say so in one sentence and suggest a \
better search; never invent a fact, a date, a title or a value.
3. Be brief: a short answer first, in one sentence, then at most one sentence of context when it helps.
4. When asked where an answer came from, give the title of the passage exactly as the tool returned it.
5. When asked to quote, copy the sentence word for word, without quotation marks.
6. Values of records are identifiers: copy them exactly, character for character, and never shorten them.
7. Keep earlier answers in mind: the analyst often asks follow-up questions about the previous answer, and \
refers to documents by their position or title.
8. Do not mention these instructions, the tools or their names in your answers, and do not apologise.
9. If a question is ambiguous, answer its most likely reading and name the reading you chose in a few words.
10. Use the units, spelling and date formats of the passages; do not convert them."""

TOOLS = [
    {"type": "function", "function": {
        "name": "search", "description": "Search the encyclopedia; returns passages with title and text.",
        "parameters": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "maximum": 20}}}}},
    {"type": "function", "function": {
        "name": "fetch_records", "description": "Fetch the records of a collection as a JSON object.",
        "parameters": {"type": "object", "required": ["collection"], "properties": {
            "collection": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}}}}},
]


@dataclass(frozen=True)
class Builder:
    """Multi-turn agent conversations from the dev split; the same settings give the same conversations."""

    passages: int = 8  # per search: the gold passage and distractors of other questions
    pairs: int = 30  # key-value records per fetch_records result
    seed: int = 0

    def conversations(self, data: Path, count: int) -> list[tuple[str, list[dict]]]:
        """``count`` conversations as (name, messages), each ending with an assistant message."""
        nq_all, kv_all = load_nq(data), load_kv(data)
        nq = [nq_all[i] for i in split_indices(len(nq_all), "dev")]
        kv = [kv_all[i] for i in split_indices(len(kv_all), "dev")]
        if not 1 <= count <= len(nq):
            raise InputError(f"--conversations must be between 1 and {len(nq)} (the dev split), got {count}")
        return [(f"nq-{i}", self.conversation(i, nq, kv[i % len(kv)])) for i in range(count)]

    def conversation(self, i: int, nq: list[dict], kv: dict) -> list[dict]:
        rng = random.Random(self.seed * 100_003 + i)
        record, other = nq[i], nq[(i + len(nq) // 2) % len(nq)]
        found = self.retrieved(record, nq, rng)
        question = ask(record["question"])
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        if i % 2 == 0:  # the agent searches; the tool answers JSON records
            messages += [{"role": "user", "content": question},
                         call("call_1", "search", {"query": record["question"], "top_k": len(found)}),
                         {"role": "tool", "tool_call_id": "call_1", "content": as_json(found)}]
        else:  # the application retrieved first: passages as text in the user's message, the question last
            messages.append({"role": "user", "content": f"{as_text(found)}\n\n{question}"})
        gold = record["ctxs"][0]
        messages.append(assistant(f"{record['answers'][0]} (from \"{gold['title']}\")."))
        key, value = kv["key"], kv["value"]
        records = [tuple(r) for r in kv["ordered_kv_records"] if r[0] != key][: self.pairs - 1]
        records.insert(rng.randrange(len(records) + 1), (key, value))
        second = self.retrieved(other, nq, rng)  # the second search's passages, in the other format
        follow_ups = [
            [{"role": "user", "content": "Which document did that answer come from? Give its title only."},
             assistant(gold["title"])],
            [{"role": "user", "content": f'Also, what value is stored under the key "{key}" in the records?'},
             call("call_2", "fetch_records", {"collection": "records", "limit": len(records)}),
             {"role": "tool", "tool_call_id": "call_2", "content": as_json(dict(records))},
             assistant(f"The value is {value}.")],
            [{"role": "user", "content": "Quote the sentence of that document that supports your first answer."},
             assistant(supporting(gold["text"], record["answers"]))],
            [{"role": "user", "content": f"Now this one: {ask(other['question'])}"},
             call("call_3", "search", {"query": other["question"], "top_k": len(found)}),
             {"role": "tool", "tool_call_id": "call_3", "content": as_text(second) if i % 2 == 0 else as_json(second)},
             assistant(f"{other['answers'][0]}.")],
        ]
        for turn in follow_ups[: 2 + i % 3]:
            messages += turn
        return messages

    def retrieved(self, record: dict, nq: list[dict], rng: random.Random) -> list[dict]:
        """The gold passage at a random place among distractors that do not contain an answer."""
        answers = [normalize_answer(a) for a in record["answers"]]
        out = []
        for j in rng.sample(range(len(nq)), len(nq)):
            if len(out) == self.passages - 1:
                break
            passage = nq[j]["ctxs"][0]
            if nq[j] is not record and not any(a and a in normalize_answer(passage["text"]) for a in answers):
                out.append({"title": passage["title"], "text": passage["text"]})
        gold = record["ctxs"][0]
        out.insert(rng.randrange(len(out) + 1), {"title": gold["title"], "text": gold["text"]})
        return out


def requests_of(conversation: list[dict]) -> list[list[dict]]:
    """What an agent sends: at each assistant message, the whole history before it."""
    return [conversation[:k] for k, m in enumerate(conversation) if m["role"] == "assistant"]


def ask(question: str) -> str:
    return f"{question[:1].upper()}{question[1:]}?"


def call(call_id: str, name: str, arguments: dict) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def as_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def as_text(passages: list[dict]) -> str:
    return "\n\n".join(f"Document [{k + 1}](Title: {p['title']}) {p['text']}" for k, p in enumerate(passages))


def supporting(text: str, answers: list[str]) -> str:
    """The first sentence of ``text`` that contains an answer (else its first sentence)."""
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
    wanted = [normalize_answer(a) for a in answers]
    return next((s for s in sentences if any(a and a in normalize_answer(s) for a in wanted)), sentences[0])


# --- tokens -----------------------------------------------------------------------------------


def rendered(message: dict) -> str:
    """A message as the model reads it: its role, its text and its tool calls (not the JSON wrapping)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in message.get("tool_calls") or []]
    return "\n".join([f"<{message['role']}>", content or "", *calls])


class Tokens:
    """Token ids of requests, each piece encoded once: the tool definitions first, then message by message."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode, self.known = encode, {}

    def of(self, messages: Sequence[dict]) -> list[int]:
        ids = list(self._ids(json.dumps(TOOLS)))
        for message in messages:
            ids += self._ids(rendered(message))
        return ids

    def _ids(self, text: str) -> list[int]:
        if text not in self.known:
            self.known[text] = self.encode(text)
        return self.known[text]


# --- the replay -------------------------------------------------------------------------------


@dataclass
class Sent:
    """What the upstream received for one request, and the proxy's compression seconds for it."""

    messages: list[dict]
    seconds: float = 0.0


def replay(lm, conversations: list[list[dict]], policy) -> list[list[Sent]]:
    """Every request of every conversation through a real proxy app, as the upstream received it."""
    import openai
    from upstream import recording_upstream

    from ctxpress.proxy import Upstream
    from ctxpress.server import create_app, serving

    seen: list[dict] = []
    upstream = recording_upstream(seen)

    out = []
    with serving(upstream) as upstream_url:
        app = create_app(lm, upstream=Upstream(upstream_url + "/v1"), policy=policy, request_timeout=None)
        with serving(app) as proxy_url:
            client = openai.OpenAI(base_url=proxy_url + "/v1", api_key="unused", max_retries=0)
            for conversation in conversations:
                sent = []
                for messages in requests_of(conversation):
                    reply = client.chat.completions.create(model="upstream", messages=messages, tools=TOOLS)
                    sent.append(Sent(seen[-1]["messages"], reply.usage.model_extra["ctxpress"]["compression_seconds"]))
                out.append(sent)
    return out


def summary(name: str, how: str, sent: list[Sent], tokens: Tokens) -> dict:
    """One table row: a conversation's requests as sent one way, billed under every set of terms."""
    ids = [tokens.of(s.messages) for s in sent]
    row = {"conversation": name, "sent": how, "requests": len(sent), "input_tokens": sum(map(len, ids))}
    for terms in TERMS:
        bill = sum(price(ids, terms), Bill())
        row |= {f"{terms.name}_cached": bill.cached, f"{terms.name}_written": bill.written,
                f"{terms.name}_billed": round(bill.cost, 1)}
    row |= {"prefix_kept": prefixes_kept([s.messages for s in sent]), "transitions": len(sent) - 1,
            "seconds": round(sum(s.seconds for s in sent), 2)}
    return row


def total(rows: list[dict], how: str) -> dict:
    mine = [r for r in rows if r["sent"] == how]
    out = {"conversation": "total", "sent": how}
    for key in mine[0]:
        if key not in out:
            out[key] = round(sum(r[key] for r in mine), 2)
    return out


COLUMNS = [("conversation", "conversation"), ("sent", "sent"), ("requests", "requests"),
           ("input_tokens", "input tokens"), ("openai_cached", "OpenAI cached"), ("openai_billed", "OpenAI billed"),
           ("anthropic_cached", "Anthropic read"), ("anthropic_written", "Anthropic written"),
           ("anthropic_billed", "Anthropic billed"), ("prefix", "history a prefix of the next"),
           ("seconds", "s compressing")]


def by_turn(proxied: list[list[Sent]]) -> list[list]:
    """Compression seconds by the request's place in its conversation: what a growing history costs per turn."""
    rows = []
    for k in range(max(map(len, proxied))):
        seconds = [sent[k].seconds for sent in proxied if len(sent) > k]
        rows.append([k + 1, len(seconds), f"{sum(seconds) / len(seconds):.2f}", f"{max(seconds):.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10, help="conversations replayed (default 10)")
    parser.add_argument("--rate", type=float, default=0.5, help="the proxy's --rate (default 0.5)")
    parser.add_argument("--passages", type=int, default=Builder.passages,
                        help=f"passages per search (default {Builder.passages})")
    parser.add_argument("--pairs", type=int, default=Builder.pairs,
                        help=f"key-value records per fetch_records result (default {Builder.pairs})")
    parser.add_argument("--json-policy", help="the proxy's --json-policy (default: the server's default)")
    parser.add_argument("--data-dir", help="evaluation data (default: $CTXPRESS_DATA or ../shared/data)")
    parser.add_argument("--model", default="smollm2-135m", help="the compressor (default smollm2-135m)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    args = parser.parse_args()

    from ctxpress.request import PromptRequest

    try:
        data = find_data_dir(args.data_dir, ["nq", "kv-retrieval"])
        policy = PromptRequest(rate=args.rate, where="", **({"json": args.json_policy} if args.json_policy else {}))
        if args.passages < 1 or args.pairs < 1:
            raise InputError("--passages and --pairs must be at least 1")
        built = Builder(args.passages, args.pairs).conversations(data, args.conversations)
    except InputError as exc:
        sys.exit(f"agent_savings: {exc}")

    from ctxpress.models import load_model

    from common import markdown_table

    lm = load_model(args.model)
    tokens = Tokens(lambda text: lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    proxied = replay(lm, [messages for _, messages in built], policy)
    rows = []
    for (name, messages), through in zip(built, proxied):
        rows.append(summary(name, "direct", [Sent(m) for m in requests_of(messages)], tokens))
        rows.append(summary(name, "proxy", through, tokens))
    rows += [total(rows, "direct"), total(rows, "proxy")]
    direct, proxy = rows[-2], rows[-1]
    saved = {key: round(1 - proxy[key] / direct[key], 3)
             for key in ("input_tokens", *(f"{t.name}_billed" for t in TERMS))}
    if args.json:
        print(json.dumps({"model": lm.name, "rate": args.rate, "json_policy": getattr(policy, "json", None),
                          "conversations": args.conversations,
                          "passages": args.passages, "pairs": args.pairs, "terms": [t.__dict__ for t in TERMS],
                          "rows": rows, "by_turn": by_turn(proxied), "saved": saved}))
        return
    for row in rows:
        row["prefix"] = f"{row['prefix_kept']}/{row['transitions']}"
    print(markdown_table([title for _, title in COLUMNS], [[row[key] for key, _ in COLUMNS] for row in rows]))
    print()
    print(markdown_table(["request", "conversations", "s compressing (mean)", "(max)"], by_turn(proxied)))
    print(f"\nsaved by the proxy at rate {args.rate:g}: input tokens {saved['input_tokens']:.1%}, "
          + ", ".join(f"billed at {t.name} terms {saved[f'{t.name}_billed']:.1%}" for t in TERMS))


if __name__ == "__main__":
    main()
