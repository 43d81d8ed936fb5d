"""End-to-end checks on the embedded SmolLM2-135M (converted once, then cached)."""

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxpress import PromptCompressor
from ctxpress.models import converted_path
from ctxpress.signals import reference_signals, token_signals

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
ESSAYS = ROOT.parent / "shared" / "data" / "pg-essays"


@pytest.fixture(scope="module")
def essay() -> str:
    if ESSAYS.is_dir():
        return (ESSAYS / "addiction.txt").read_text(encoding="utf-8")[:2500]
    return (ROOT / "docs" / "prompt-compression.md").read_text(encoding="utf-8")


def test_embedded_model_is_cached_llama_gqa(smollm):
    assert (converted_path("smollm2-135m") / "model.safetensors").is_file()
    cfg = smollm.model.config
    assert cfg.model_type == "llama" and cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert smollm.max_positions == 8192


def test_signals_match_reference_on_real_model(smollm, essay):
    ids = smollm.tokenizer(essay, add_special_tokens=False, return_tensors="pt").input_ids[0][:256]
    got = token_signals(smollm.model, [ids])[0]
    ref = reference_signals(smollm.model, ids)
    torch.testing.assert_close(got.attention, ref.attention, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got.self_information[1:], ref.self_information[1:], atol=1e-3, rtol=1e-3)


def test_dac_on_real_text(smollm, essay):
    pc = PromptCompressor(smollm, progress=False)
    result = pc.compress(essay, rate=0.5, question="What makes things addictive?", method="dac",
                         force_tokens=["[:newline:]"])
    assert abs(result.compressed_tokens - round(0.5 * result.origin_tokens)) <= 1
    assert result.settings["stages_run"] == min(max(1, result.origin_tokens // 100), 15)
    assert "\ufffd" not in result.compressed_text
    assert result.compressed_text.count("\n") == essay.count("\n")  # newlines forced
    # DAC keeps more of what the model finds surprising than random dropping does
    ids = pc.tokenizer(essay, add_special_tokens=False, return_tensors="pt").input_ids[0]
    info = token_signals(smollm.model, [ids], attention=False)[0].self_information
    rand = pc.compress(essay, rate=0.5, method="random")
    kept_info = info[result.kept_token_indices[1:]].nanmean()
    assert kept_info > info[rand.kept_token_indices[1:]].nanmean()


def test_default_keeps_words_whole(smollm, essay):
    """The default compresses in whole words (names and dates as one unit): every word of the output is a
    word of the input."""
    pc = PromptCompressor(smollm, progress=False)
    result = pc.compress(essay, rate=0.4)
    assert result.method == "dac-words" and result.settings["unit"] == "phrase"
    assert result.compressed_tokens <= round(0.4 * result.origin_tokens)
    # Trailing punctuation marks are units of their own (one may follow a different word after
    # compression), so words are compared without them: each kept word is a whole input word.
    def bare(text: str) -> list[str]:
        return [w.rstrip(string.punctuation) for w in text.split() if w.rstrip(string.punctuation)]

    original = set(bare(essay))
    assert [w for w in bare(result.compressed_text) if w not in original] == []
    token_level = pc.compress(essay, rate=0.4, method="dac-static")
    assert [w for w in bare(token_level.compressed_text) if w not in original]  # the check can fail: tokens glue


def test_cli_default_model_json(tmp_path):
    doc = ROOT / "docs" / "prompt-compression.md"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ctxpress.cli", "compress", str(doc), "--rate", "0.5", "--json",
         "--method", "dac-static"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "dac-static"
    assert abs(result["compressed_tokens"] - round(0.5 * result["origin_tokens"])) <= 1


def test_needle_survives_eviction(smollm):
    """RoPE positions survive eviction on the real model: with 60% of the cache
    evicted, the kept needle is still read correctly; StreamingLLM, which evicts the
    middle of the context where the needle is, loses it. (At 70-75% evicted this
    135M model starts dropping a digit of the needle under SpindleKV: a limit of
    the budget, not of positions, which would garble every answer.)"""
    from ctxpress.kv.generation import answer_questions

    if not ESSAYS.is_dir():
        pytest.skip("needs the essays in ../shared/data")
    words = (ESSAYS / "addiction.txt").read_text(encoding="utf-8").split()
    context = " ".join(words[:300]) + " The secret passkey is 71432. Remember it. " + " ".join(words[300:600])
    question = "What is the secret passkey? Answer with the number only."
    for method in ("full", "snapkv", "spindlekv", "streaming"):
        options = {} if method == "full" else {"ratio": 0.4}
        result = answer_questions(smollm, context, [question], method, max_new_tokens=12,
                                  question_aware=True, **options)[0]
        assert ("71432" in result.answer) == (method != "streaming"), (method, result.answer)
        if method != "full":
            assert result.cache_bytes <= 0.4 * result.full_cache_bytes
