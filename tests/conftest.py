"""Shared fixtures: tiny random models built in code, and the real embedded model.

Unit tests run on small randomly initialised Llama models (GQA and plain
multi-head) with a byte-level BPE tokenizer trained here on a few paragraphs,
so they need no download and take milliseconds per forward pass. Tests marked
``model`` use the embedded SmolLM2-135M.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import DynamicCache

from ctxpress.compat import with_cache
from ctxpress.models import LoadedModel

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Prompt compression removes the tokens of a prompt that carry the least information.",
    "A small language model reads the prompt once and scores every token by its surprise.",
    "Tokens that are predictable and rarely attended to are dropped first, in several stages.",
    "Numbers such as 3.14159, 2025 and 1,000,000 appear in reports; so do dates like 2024-05-01.",
    "Unicode text: naïve café, 東京と大阪, emoji 😀👍🏽🤖, and “quotes” — dashes too.\n\nNew paragraph.",
    "Key-value caches grow with the context; evicting tokens saves memory during decoding.",
]

TEXT = (
    "Prompt compression makes long prompts cheaper. A small model reads the text once and "
    "gives every token two signals: how surprising it was, and how much attention it received. "
    "Tokens with low scores are dropped.\n\nThe numbers 12, 345 and 6789 matter; so does "
    "punctuation! Unicode stays intact: 東京, café, 😀👍🏽.\n"
    "Each stage re-scores what is left, so that the neighbours of a dropped token are judged again."
)


# Property tests: a fast profile inside `make test`, a long one for `make test-properties`.
settings.register_profile("fast", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("CTXPRESS_PROPERTIES", "fast"))


def running_server(app, host: str = "127.0.0.1"):
    """A real HTTP server for ``app`` (:func:`ctxpress.server.serving`), imported only by the tests
    that serve, so the KV tests also run where the serve extra is not installed (a GPU machine)."""
    from ctxpress.server import serving

    return serving(app, host)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module, importable the way it runs: with ``benchmarks/`` on the
    path (for ``common``) and registered under its name (dataclasses look their module up there)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(vocab: int, kv_heads: int, *, layers: int = 3, heads: int = 4, seed: int = 0,
               max_positions: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    # Larger random weights give peaked, varied attention instead of near-uniform maps.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm(tokenizer) -> LoadedModel:
    """Random Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    return LoadedModel("tiny-gqa", make_model(len(tokenizer), kv_heads=2), tokenizer)


@pytest.fixture(scope="session")
def tiny_mha_lm(tokenizer) -> LoadedModel:
    """Random Llama with plain multi-head attention."""
    return LoadedModel("tiny-mha", make_model(len(tokenizer), kv_heads=4, seed=1), tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_lm) -> str:
    """The GQA tiny model saved as a checkpoint directory, for `--model PATH`."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_lm.model.save_pretrained(path)
    tiny_lm.tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded SmolLM2-135M (converted once into the cache)."""
    from ctxpress.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def text() -> str:
    return TEXT


# -- KV tests ------------------------------------------------------------------------------
N = 160  # prompt tokens of the KV tests


@pytest.fixture(params=["tiny_lm", "tiny_mha_lm"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def prompt(lm):
    torch.manual_seed(0)
    return torch.randint(1, len(lm.tokenizer), (1, N))  # 0 is the pad id


def greedy(model, ids, **kw):
    kw = {"max_new_tokens": 12, **kw}
    return model.generate(ids, do_sample=False, pad_token_id=0, **kw)


def compressed(model, press, ids):
    cache = press.cache(model)
    with torch.no_grad():
        model(ids, **with_cache(model, cache))
    return cache


def reference_layers(model, ids):
    """Dense keys/values and attention maps of a plain eager prefill."""
    from ctxpress.attention import attention_implementation

    cache = DynamicCache(config=model.config)
    with torch.no_grad(), attention_implementation(model, "eager"):
        out = model(ids, **with_cache(model, cache), output_attentions=True)
    return [(layer.keys, layer.values) for layer in cache.layers], out.attentions
