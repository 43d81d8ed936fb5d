"""Properties at the edges users touch: the command line, ``/v1/compress`` and the KV byte budget.

Whatever is generated (text from ``test_properties``, budgets, methods, option values, raw bodies),
the CLI ends 0 or 2 with a one-line error, the HTTP API answers 200 or a 4xx JSON error (never a
500), and every press that builds keeps its byte budget after prefill or refuses in one line.
"""

import io
import json
import re
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from test_properties import texts

from ctxpress.cli import main
from ctxpress.compat import with_cache
from ctxpress.errors import InputError
from ctxpress.kv import PRESSES, build_press
from ctxpress.prompt import METHODS
from ctxpress.words import token_words

json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
# Mostly valid requests, so that the success path is exercised as much as the refusals.
rates = st.floats(min_value=0.05, max_value=1.0)
budgets = st.one_of(rates, rates, st.integers(1, 300), st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
                    st.integers(-2, 0))
method_names = st.one_of(st.sampled_from(sorted(METHODS)), st.sampled_from(sorted(METHODS)), st.text(max_size=10))
option_pairs = st.one_of(st.just({}), st.dictionaries(
    st.sampled_from(["unit", "stages", "alpha", "seed", "bogus", ""]),
    st.sampled_from(["word", "token", "2", "0.5", "-1", "x", "", "nan"]), max_size=2))


def one_line_error(err: str) -> bool:
    lines = [line for line in err.splitlines() if line.strip()]
    # "ctxpress: error: ..." from a command, "ctxpress compress: error: ..." from argument parsing
    return len(lines) == 1 and re.match(r"ctxpress( compress)?: error: \S", lines[0]) is not None


@given(text=texts, budget=budgets, as_tokens=st.booleans(), method=method_names, options=option_pairs)
def test_cli_compress_ends_0_or_2_with_one_line(tiny_model_dir, text, budget, as_tokens, method, options):
    stdout, stderr = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, redirect_stdout(stdout), redirect_stderr(stderr):
        src = Path(tmp) / "in.txt"
        src.write_text(text, encoding="utf-8")
        flag = ["--target-tokens", str(int(budget))] if as_tokens else ["--rate", repr(budget)]
        opts = [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
        code = main(["compress", str(src), *flag, "--method", method, *opts, "--model", tiny_model_dir, "--json"])
    out, err = stdout.getvalue(), stderr.getvalue()
    event(f"exit {code}")
    assert code in (0, 2), err
    if code == 2:
        assert one_line_error(err), err
    else:
        result = json.loads(out)
        assert result["compressed_tokens"] <= result["origin_tokens"]


@pytest.fixture(scope="module")
def http(tiny_lm):
    from fastapi.testclient import TestClient

    from ctxpress.server import create_app

    with TestClient(create_app(tiny_lm, max_request_bytes=64 * 1024), raise_server_exceptions=False) as client:
        yield client


valid_bodies = st.fixed_dictionaries({"context": st.one_of(texts, st.lists(texts, min_size=1, max_size=3))},
                                     optional={"rate": rates, "method": st.sampled_from(sorted(METHODS)),
                                               "question": st.text(max_size=20),
                                               "force_tokens": st.lists(st.sampled_from(["x", "[:digit:]"]),
                                                                        max_size=2)})
any_bodies = st.fixed_dictionaries({}, optional={
    "context": st.one_of(texts, st.lists(texts, max_size=3), json_values),
    "rate": st.one_of(budgets, json_values), "target_tokens": st.one_of(budgets, json_values),
    "method": st.one_of(method_names, json_values), "question": st.one_of(st.text(max_size=20), json_values),
    "force_tokens": st.one_of(st.lists(st.text(max_size=4), max_size=2), json_values),
    "options": st.one_of(option_pairs, json_values), "extra": json_values})


@given(body=st.one_of(valid_bodies, valid_bodies, any_bodies, json_values, st.binary(max_size=64)))
def test_http_compress_answers_200_or_a_4xx_json_error(http, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN, Infinity included as Python writes them
    r = http.post("/v1/compress", content=raw, headers={"content-type": "application/json"})
    event(f"HTTP {r.status_code}")
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    payload = r.json()
    if r.status_code == 200:
        assert payload["compressed_tokens"] <= payload["origin_tokens"]
    else:
        assert payload["error"]["message"]


press_options = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([8, 4, 2, 3]), "unit": st.sampled_from(["token", "word", "line"]),
    "window": st.integers(0, 40), "per_head": st.booleans(), "codebook": st.booleans(),
    "evict": st.booleans(), "sinks": st.integers(0, 8), "unit_score": st.sampled_from(["max", "mean"]),
    "rest_bits": st.sampled_from([8, 4, 2, 3])})


@given(name=st.sampled_from(sorted(set(PRESSES) - {"full"})), options=press_options,
       ratio=st.floats(min_value=0.02, max_value=0.95), n=st.integers(8, 96), seed=st.integers(0, 3))
def test_a_press_that_builds_keeps_its_byte_budget(tiny_lm, name, options, ratio, n, seed):
    try:
        press = build_press(name, ratio=ratio, **options)
    except InputError as err:
        assert str(err) and "\n" not in str(err)
        event("refused at construction")
        return
    ids = torch.randint(1, 300, (1, n), generator=torch.Generator().manual_seed(seed))
    units = token_words(tiny_lm.tokenizer, ids[0].tolist()) if press.needs_words() else None
    try:
        cache = press.cache(tiny_lm.model, units)
        with torch.no_grad():
            tiny_lm.model(ids, **with_cache(tiny_lm.model, cache))
    except InputError as err:  # a budget under one token, or a store larger than the budget
        assert str(err) and "\n" not in str(err)
        event("refused at compression")
        return
    event("built and compressed")
    assert cache.nbytes() <= ratio * cache.dense_nbytes()
