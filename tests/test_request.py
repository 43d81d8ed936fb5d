"""One prompt-compression request type: each bad field is one clear error on every surface,
and ``prompt_compression`` means the same on the local chat endpoint as on the proxy."""

import argparse

import pytest

from ctxpress.errors import InputError
from ctxpress.request import DEFAULT_RATE, MESSAGE_FIELDS, PromptRequest

from conftest import TEXT

BAD_FIELDS = [
    ({"rate": 0}, "rate must be in (0, 1], got 0"),
    ({"rate": 1.5}, "rate must be in (0, 1]"),
    ({"rate": float("nan")}, "rate must be in (0, 1]"),
    ({"rate": "half"}, "rate has the wrong type (str; a number is expected)"),
    ({"rate": True}, "rate has the wrong type (bool"),
    ({"target_tokens": 0}, "target_tokens must be >= 1, got 0"),
    ({"target_tokens": 2.5}, "target_tokens has the wrong type (float; an integer is expected)"),
    ({"rate": 0.5, "target_tokens": 10}, "give rate or target_tokens (exactly one)"),
    ({}, "give rate or target_tokens (exactly one)"),
    ({"rate": 0.5, "min_tokens": -1}, "min_tokens must be >= 0, got -1"),
    ({"rate": 0.5, "min_tokens": "many"}, "min_tokens has the wrong type"),
    ({"rate": 0.5, "roles": ["narrator"]}, "unknown role 'narrator'"),
    ({"rate": 0.5, "roles": "user"}, "roles must be a list of role names"),
    ({"rate": 0.5, "method": "zip"}, "unknown method 'zip'"),
    ({"rate": 0.5, "method": 3}, "method has the wrong type"),
    ({"rate": 0.5, "options": {"bogus": 1}}, "has no option bogus"),
    ({"rate": 0.5, "options": {"alpha": 2}}, "alpha must be in [0, 1]"),
    ({"rate": 0.5, "options": [1]}, "options has the wrong type"),
    ({"rate": 0.5, "ratio": 0.5}, "unknown field 'ratio' (known: "),
    ({"rate": 0.5, "json": "drop"}, "unknown json policy 'drop' (choose from: keep, values)"),
    ({"rate": 0.5, "code": "minify"}, "unknown code policy 'minify' (choose from: keep, compress)"),
    ({"rate": 0.5, "json": True}, "json has the wrong type (bool; text is expected)"),
]


@pytest.mark.parametrize("body, message", BAD_FIELDS)
def test_each_bad_field_is_one_clear_input_error(body, message):
    with pytest.raises(InputError) as caught:
        PromptRequest.from_mapping(body, allowed=MESSAGE_FIELDS, where="prompt_compression")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_mapping_that_is_no_object_is_refused():
    with pytest.raises(InputError, match="prompt_compression must be an object"):
        PromptRequest().overridden(["rate", 0.5])
    with pytest.raises(InputError, match="the request must be an object"):
        PromptRequest.from_mapping("rate=0.5")


def test_overrides_replace_the_budget_and_keep_the_rest():
    base = PromptRequest(target_tokens=40, rate=None, roles=("user",), min_tokens=10)
    assert base.overridden(None) is base
    changed = base.overridden({"rate": 0.3})
    assert (changed.rate, changed.target_tokens, changed.roles, changed.min_tokens) == (0.3, None, ("user",), 10)
    changed = PromptRequest().overridden({"target_tokens": 12, "roles": []})
    assert (changed.rate, changed.target_tokens, changed.roles) == (None, 12, ())
    assert PromptRequest().rate == DEFAULT_RATE
    assert PromptRequest().overridden({"min_tokens": 0}).min_tokens == 0  # 0: every non-empty message
    configured = PromptRequest.from_args(argparse.Namespace(rate=None, target_tokens=None, method="dac", options=[]))
    with pytest.raises(InputError, match=r"^prompt_compression: rate must be in"):  # named as the client sent it
        configured.overridden({"rate": 2})


def test_context_requests_name_their_budget_and_their_kept_parts():
    asked = PromptRequest.from_mapping({"target_tokens": 30, "question": "Why?", "force_tokens": ["x"]})
    assert asked.budget == {"target_tokens": 30} and asked.question == "Why?" and asked.force_tokens == ("x",)
    with pytest.raises(InputError, match="unknown field 'roles'"):  # a single context has no messages
        PromptRequest.from_mapping({"rate": 0.5, "roles": ["user"]})
    with pytest.raises(InputError, match="force_tokens must be a list of strings"):
        PromptRequest.from_mapping({"rate": 0.5, "force_tokens": [1]})


def test_from_args_takes_the_command_lines_options():
    args = argparse.Namespace(rate=None, target_tokens=None, method="dac", options=["stages=2"],
                              compress_roles=("user",), min_tokens=0, json_policy="values", code_policy="compress")
    asked = PromptRequest.from_args(args)
    assert (asked.rate, asked.method, asked.options, asked.roles, asked.min_tokens, asked.json, asked.code) == (
        DEFAULT_RATE, "dac", {"stages": 2}, ("user",), 0, "values", "compress")
    with pytest.raises(InputError, match="has no option colour"):
        PromptRequest.from_args(argparse.Namespace(rate=0.5, target_tokens=None, method="dac", options=["colour=1"]))


@pytest.fixture(scope="module")
def http(tiny_lm):
    from fastapi.testclient import TestClient

    from ctxpress.server import create_app

    with TestClient(create_app(tiny_lm, max_new_tokens=8), raise_server_exceptions=False) as client:
        yield client


# as JSON: no NaN; and {} is valid here, the server's default budget applies
CHAT_BAD_FIELDS = [(body, message) for body, message in BAD_FIELDS if body and body.get("rate") == body.get("rate")]


@pytest.mark.parametrize("body, message", CHAT_BAD_FIELDS)
def test_bad_prompt_compression_is_a_400_on_the_local_chat(http, body, message):
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                "prompt_compression": body, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


@pytest.mark.parametrize("body, message", [
    ({"rate": 1.5}, "rate must be in (0, 1]"), ({"target_tokens": 0}, "target_tokens must be >= 1"),
    ({"rate": 0.5, "target_tokens": 9}, "exactly one"), ({}, "exactly one"),
    ({"rate": 0.5, "options": {"bogus": 1}}, "no option bogus"), ({"rate": 0.5, "min_tokens": 3}, "min_tokens"),
])
def test_bad_compress_bodies_are_400(http, body, message):
    r = http.post("/v1/compress", json={"context": TEXT, **body})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]


KEPT = "Keep this exact sentence, 48151623, verbatim."
LONG = " ".join(f"Sentence {i} says the small local model reads every word before the answer." for i in range(3))


def test_local_chat_applies_the_proxys_message_policy(tiny_lm):
    """Roles, keep tags and the protected question: the same rules as ``serve --upstream``.

    (Before, the local chat compressed every non-assistant message whole and left keep tags in.)
    """
    from ctxpress.prompt import PromptCompressor
    from ctxpress.server.chat import ChatService
    from ctxpress.server.schemas import ChatBody

    service = ChatService(tiny_lm, PromptCompressor(tiny_lm, progress=False), max_new_tokens=8)
    question = "Which number is kept?"
    body = ChatBody(messages=[{"role": "system", "content": LONG},
                              {"role": "user", "content": f"{LONG} <ctxpress:keep>{KEPT}</ctxpress:keep> {LONG}"
                                                          f"\n\n{question}"}],
                    prompt_compression={"rate": 0.5, "min_tokens": 20})

    def prompt(override: dict) -> tuple[str, int, int]:
        policy, press = service.checked(body.model_copy(update={"prompt_compression": override}))
        plan = service.plan(body, policy, press)
        return tiny_lm.tokenizer.decode(plan.ids[0]), int(plan.ids.shape[1]), plan.tokens_before

    text, after, before = prompt({"rate": 0.5, "min_tokens": 20})
    assert KEPT in text and "ctxpress:keep" not in text and text.count(question) == 1
    assert after < 0.75 * before
    assert LONG not in text  # the system message was compressed too
    text, after, _ = prompt({"rate": 0.5, "min_tokens": 20, "roles": ["system"]})
    assert LONG in text and KEPT in text  # the user message, not of the roles, is only untagged
    assert f"<ctxpress:keep>{KEPT}" not in text
    _, after, before = prompt({"roles": []})  # the server's default budget, no role: nothing compressed
    assert after < before  # only the tags' tokens are gone
