"""Every press on a CUDA device: the same stored bytes and the same next-token logits as on the CPU.

Skipped where no CUDA device is present (CI and the development machines run
on CPU); on a GPU machine ``pytest tests/test_cuda.py`` runs it. The model is
the tiny GQA Llama of the other KV tests, in float32 on both devices, and
both decode the same fixed tokens after compression, so one near-tied
argmax cannot send the two runs down different continuations.
"""

from __future__ import annotations

import pytest
import torch

from ctxpress.compat import with_cache
from ctxpress.kv import PRESSES, build_press
from ctxpress.words import token_words

from conftest import N, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 6
# Every registered press at its defaults, and the options that change what is stored.
CONFIGS = [(name, {}) for name in PRESSES] + [
    ("snapkv", {"unit": "word"}), ("snapkv", {"bits": 4}), ("spindlekv-words", {"bits": 8}),
    ("spindlekv", {"adaptive": True}), ("quantized", {"bits": 2}),
]


def _run(model, name: str, options: dict, prompt: torch.Tensor, tokens: torch.Tensor, units):
    press = build_press(name, **({"ratio": 0.3} if PRESSES[name].takes_budget(options) else {}), **options)
    device = next(model.parameters()).device
    cache = press.cache(model, None if press.needs_words() is None else units.to(device))
    logits = []
    with torch.no_grad():
        out = model(prompt.to(device), use_cache=True, **with_cache(model, cache))
        logits.append(out.logits[:, -1])
        for token in tokens.to(device):
            out = model(token.view(1, 1), **with_cache(model, cache))
            logits.append(out.logits[:, -1])
    return cache.nbytes(), torch.cat(logits).float().cpu()


@pytest.fixture(scope="module")
def models(tokenizer):
    cpu = make_model(len(tokenizer), kv_heads=2)
    gpu = make_model(len(tokenizer), kv_heads=2).to("cuda")  # the same seed: the same weights
    return cpu, gpu


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=lambda c: c if isinstance(c, str) else
                         ":".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_press_on_cuda_matches_cpu(models, tokenizer, name, options):
    torch.manual_seed(0)
    prompt = torch.randint(1, len(tokenizer), (1, N))
    tokens = torch.randint(1, len(tokenizer), (STEPS,))
    units = token_words(tokenizer, prompt[0].tolist())
    cpu_bytes, cpu_logits = _run(models[0], name, options, prompt, tokens, units)
    gpu_bytes, gpu_logits = _run(models[1], name, options, prompt, tokens, units)
    assert gpu_bytes == cpu_bytes
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=2e-3, rtol=2e-3)
