"""The message policy on structured content and across turns: JSON and code stay valid, a conversation's
compressed history is stable from turn to turn, and the compressed-text cache answers repeated messages."""

import itertools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from ctxpress.messages import Shrinker, Shrunk, ShrunkCache, Tally
from ctxpress.prompt import PromptCompressor
from ctxpress.request import PromptRequest
from ctxpress.structured import REPEATED_KEYS, fenced_spans, looks_like_code, parse_json

from conftest import TEXT

PROSE = " ".join(f"Sentence {i} says the small local model reads every word before the answer." for i in range(8))
PYTHON = '''import json


def load(path: str) -> dict:
    """Read one settings file."""
    with open(path) as handle:
        values = json.load(handle)
    if "name" not in values:
        raise KeyError("name")
    return {key: value for key, value in values.items() if value is not None}
'''
JAVASCRIPT = '''function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}
export default debounce;
'''
SQL = '''SELECT c.name, COUNT(o.id) AS orders
FROM customers c
LEFT JOIN orders o ON o.customer_id = c.id
WHERE c.created_at > '2024-01-01'
GROUP BY c.name
ORDER BY orders DESC
LIMIT 10;
'''
RECORDS = [{"title": f"Document {i}", "text": PROSE, "url": f"https://example.org/{i}", "score": 0.5 + i / 100,
            "cited": i % 2 == 0, "notes": None, "tags": ["short", "list"]} for i in range(4)]


@pytest.fixture(scope="module")
def shrinker(tiny_lm) -> Shrinker:
    return Shrinker(PromptCompressor(tiny_lm, progress=False))


def policy(**changes) -> PromptRequest:
    """The tests' policy (half of each message of over 20 tokens kept), with ``changes`` as a request makes them."""
    return PromptRequest(rate=0.5, min_tokens=20).overridden(changes or None)


def skeleton(value: object) -> object:
    """The structure of a JSON value: keys, nesting and every non-string value; strings become one marker."""
    if isinstance(value, dict):
        return {key: skeleton(item) for key, item in value.items()}
    if isinstance(value, list):
        return [skeleton(item) for item in value]
    return "<str>" if isinstance(value, str) else value


# -- detection ----------------------------------------------------------------------------


def test_json_is_an_object_or_array_that_parses():
    assert parse_json('  {"a": [1, 2]}\n') == {"a": [1, 2]}
    assert parse_json("[]") == []
    for text in ('"a string"', "42", "{not json}", '{"a": 1} trailing', "", PROSE):
        assert parse_json(text) is None, text
    assert parse_json('[{"a": 1, "a": 2}]') is REPEATED_KEYS  # JSON, but writing it again would lose a key


def test_fenced_blocks_are_found_with_both_fences():
    text = f"Intro.\n```python\n{PYTHON}```\nMiddle.\n~~~json\n{{\"a\": 1}}\n```\nstill json\n~~~\nEnd.\n"
    spans = [text[a:b] for a, b in fenced_spans(text)]
    assert spans == [f"```python\n{PYTHON}```", '~~~json\n{"a": 1}\n```\nstill json\n~~~']  # ``` does not close ~~~
    unclosed = "Text.\n````\nopen block\n```\nto the end"
    assert [unclosed[a:b] for a, b in fenced_spans(unclosed)] == [unclosed[6:]]  # a shorter fence does not close;
    # a block never closed runs to the end
    assert fenced_spans(PROSE) == [] and fenced_spans("inline ``` is no fence") == []


@pytest.mark.parametrize("code", [PYTHON, JAVASCRIPT, SQL,
                                  'Traceback (most recent call last):\n  File "main.py", line 3, in <module>\n'
                                  '    main()\nValueError: bad value\n'])
def test_source_code_is_recognised(code):
    assert looks_like_code(code)


@pytest.mark.parametrize("prose", [
    PROSE, TEXT,
    "Results of the search:\n- The first document is about the city.\n  - and its old bridge\n"
    "- The second one describes the river.\n- The last is a list of museums, with opening hours.",
    "Prompt compression removes the tokens of a prompt that carry\nthe least information. A small model reads "
    "the prompt once,\nscores every token by its surprise, and the tokens that are\npredictable are dropped "
    "first, in several stages, from the\nlongest documents to the shortest ones.",
    "one\ntwo",  # too short to say
])
def test_prose_is_not_taken_for_code(prose):
    assert not looks_like_code(prose)


# -- JSON and code in messages ------------------------------------------------------------


def test_json_is_kept_byte_identical_by_default(shrinker):
    text = json.dumps(RECORDS, indent=2)
    tally = Tally()
    out = shrinker.messages([{"role": "tool", "tool_call_id": "c1", "content": text}], policy(), tally)
    assert out[0]["content"] == text and tally.before == tally.after > 20 and tally.compressed == 0


def test_json_values_keep_every_key_and_parse(shrinker):
    text = json.dumps({"results": RECORDS, "query": "who reads every word?", "total": 4}, indent=2)
    tally = Tally()
    sent = shrinker.text(text, policy(json="values"), tally, eligible=True, tool=True)
    value = json.loads(sent)
    assert skeleton(value) == skeleton(json.loads(text))  # same keys, nesting, numbers, booleans, nulls
    assert value["query"] == "who reads every word?" and value["results"][0]["url"] == "https://example.org/0"
    assert value["results"][0]["tags"] == ["short", "list"]  # short strings untouched
    assert all(len(record["text"]) < 0.8 * len(PROSE) for record in value["results"])  # long ones compressed
    assert sent == json.dumps(value, ensure_ascii=False, separators=(",", ":"))  # written compactly
    assert tally.compressed == 1 and tally.after < 0.7 * tally.before


def test_json_with_a_repeated_key_is_kept_as_it_is(shrinker):
    text = json.dumps(RECORDS)[:-1] + f', {{"text": "{PROSE}", "text": "{PROSE}"}}]'
    assert shrinker.text(text, policy(json="values"), Tally(), eligible=True, tool=True) == text


def test_json_string_values_that_are_json_or_code_are_kept(shrinker):
    nested = json.dumps({"inner": PROSE})
    text = json.dumps({"payload": nested, "source": PYTHON, "summary": PROSE})
    value = json.loads(shrinker.text(text, policy(json="values"), Tally(), eligible=True))
    assert value["payload"] == nested and value["source"] == PYTHON and len(value["summary"]) < len(PROSE)


def test_json_of_a_role_not_compressed_or_short_json_is_left_as_it_is(shrinker):
    text = json.dumps(RECORDS, indent=1)
    for role_policy in (policy(json="values", roles=["user"]), policy(json="values", min_tokens=100_000),
                        policy(json="values", rate=1)):
        out = shrinker.messages([{"role": "tool", "content": text}], role_policy, Tally())
        assert out[0]["content"] == text


def test_tool_call_arguments_are_never_altered(shrinker):
    arguments = json.dumps({"query": PROSE, "filters": {"year": 2024, "lang": "en"}})
    calls = [{"id": "c1", "type": "function", "function": {"name": "search", "arguments": arguments}}]
    messages = [{"role": "user", "content": PROSE},
                {"role": "assistant", "content": PROSE, "tool_calls": calls}]
    out = shrinker.messages(messages, policy(json="values", roles=["user", "assistant"]), Tally())
    assert out[1]["tool_calls"] == calls and out[1]["tool_calls"][0]["function"]["arguments"] == arguments
    assert len(out[1]["content"]) < len(PROSE)  # the assistant's text itself was compressed


def test_fenced_code_arrives_byte_identical_and_the_prose_around_it_is_compressed(shrinker):
    blocks = [f"```python\n{PYTHON}```", f"~~~\n{SQL}~~~", '```json\n{"a": [1, 2, {"b": null}]}\n```']
    text = f"{PROSE}\n\n{blocks[0]}\n{PROSE}\n{blocks[1]}\n\n{PROSE}\n{blocks[2]}\n\nWhat does load return?"
    sent = shrinker.messages([{"role": "user", "content": text}], policy(), Tally())[0]["content"]
    assert all(block in sent for block in blocks)
    assert sent.endswith("\n\nWhat does load return?") and len(sent) < len(text) - len(PROSE)
    opted = shrinker.text(text, policy(code="compress"), Tally(), eligible=True)
    assert blocks[0] not in opted  # code: "compress" treats code as prose


def test_a_tool_result_that_is_code_is_kept_whole_and_prose_is_not(shrinker):
    for code in (PYTHON * 3, JAVASCRIPT * 3):
        tally = Tally()
        assert shrinker.text(code, policy(), tally, eligible=True, tool=True) == code and tally.compressed == 0
    assert len(shrinker.text(PYTHON * 3, policy(), Tally(), eligible=True)) < len(PYTHON * 3)  # not a tool's
    assert len(shrinker.text(PROSE, policy(), Tally(), eligible=True, tool=True)) < len(PROSE)


def test_content_parts_follow_the_same_rules(shrinker):
    text = json.dumps(RECORDS)
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": "data:,"}},
             {"type": "text", "text": f"{PROSE}\n\nWhich record is cited?"}]
    out = shrinker.messages([{"role": "user", "content": parts}], policy(), Tally())[0]["content"]
    assert out[0]["text"] == text and out[1] == parts[1]
    assert out[2]["text"].endswith("\n\nWhich record is cited?") and len(out[2]["text"]) < len(parts[2]["text"])


# -- history and cache --------------------------------------------------------------------


def conversation() -> list[list[dict]]:
    """Five turns of an agent's chat: each turn's request is the previous one plus new messages."""
    search = {"id": "call_1", "type": "function",
              "function": {"name": "search", "arguments": json.dumps({"query": "local model"})}}
    turns = [
        [{"role": "system", "content": f"Answer from the documents.\n\n{PROSE}"},
         {"role": "user", "content": f"{TEXT}\n\n{PROSE}\n\nWhat does the small model read?"}],
        [{"role": "assistant", "content": None, "tool_calls": [search]},
         {"role": "tool", "tool_call_id": "call_1", "content": json.dumps(RECORDS)},
         {"role": "user", "content": "Summarise the records."}],
        [{"role": "assistant", "content": PROSE},
         {"role": "user", "content": f"Here is my code:\n```python\n{PYTHON}```\n{PROSE}\n\nIs it right?"}],
        [{"role": "assistant", "content": "It is."},
         {"role": "user", "content": [{"type": "text", "text": f"{TEXT}\n\nAnd this one?"}]}],
        [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": f"{PROSE}\n\nThanks!"}],
    ]
    requests, history = [], []
    for new in turns:
        history = history + new
        requests.append(history)
    return requests


@pytest.mark.parametrize("cache_size", [0, 64])
def test_each_turns_compressed_history_is_a_prefix_of_the_next(tiny_lm, cache_size):
    shrinker = Shrinker(PromptCompressor(tiny_lm, progress=False), cache_size=cache_size)
    sent = [shrinker.messages(request, policy(json="values"), Tally()) for request in conversation()]
    for turn, following in itertools.pairwise(sent):
        assert json.dumps(following[: len(turn)]) == json.dumps(turn)  # byte-identical
    first_user = sent[-1][1]["content"]
    assert first_user.endswith("\n\nWhat does the small model read?") and len(first_user) < len(TEXT) + len(PROSE)
    assert json.loads(sent[-1][3]["content"])[0].keys() == RECORDS[0].keys()


def test_the_cache_answers_repeated_messages_with_the_same_text(tiny_lm):
    shrinker = Shrinker(PromptCompressor(tiny_lm, progress=False), cache_size=64)
    uncached = Shrinker(PromptCompressor(tiny_lm, progress=False), cache_size=0)
    requests = conversation()
    tallies = []
    for request in requests:
        tally = Tally()
        assert shrinker.messages(request, policy(json="values"), tally) == uncached.messages(
            request, policy(json="values"), Tally())
        tallies.append(tally)
    assert tallies[0].cache_hits == 0 and tallies[0].compressed == 2
    for before, after in itertools.pairwise(tallies):  # everything earlier turns compressed is a hit
        assert after.cache_hits == before.compressed
    again = Tally()
    shrinker.messages(requests[-1], policy(json="values"), again)
    assert again.cache_hits == again.compressed == tallies[-1].compressed and again.seconds == 0
    assert (again.before, again.after) == (tallies[-1].before, tallies[-1].after)
    assert again.usage()["cache_hits"] == again.cache_hits
    other = Tally()  # another budget is another compressed text
    shrinker.messages(requests[0], policy(rate=0.3), other)
    assert other.cache_hits == 0 and other.compressed == 2


def test_the_cache_is_bounded_and_forgets_the_least_recently_used():
    cache = ShrunkCache(2)
    for key in (b"a", b"b"):
        cache.put(key, Shrunk(key.decode(), 2, 1, True))
    assert cache.get(b"a").text == "a"  # now the most recent
    cache.put(b"c", Shrunk("c", 2, 1, True))
    assert len(cache) == 2 and cache.get(b"b") is None and cache.get(b"a") is not None
    off = ShrunkCache(0)
    off.put(b"a", Shrunk("a", 2, 1, True))
    assert len(off) == 0


def test_the_cache_is_safe_across_threads(tiny_lm):
    shrinker = Shrinker(PromptCompressor(tiny_lm, progress=False), cache_size=4)  # small: evictions race too
    texts = [f"{PROSE} Variant {i}." for i in range(8)]
    expected = [Shrinker(shrinker.compressor, cache_size=0).text(t, policy(), Tally(), True) for t in texts]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: shrinker.text(t, policy(), Tally(), True), texts * 3))
    assert got == expected * 3 and len(shrinker.cache) == 4
