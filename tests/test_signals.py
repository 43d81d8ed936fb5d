"""Token signals from one pass equal the direct output_attentions definition."""

import pytest
import torch

from ctxpress.attention import attention_implementation
from ctxpress.signals import batched_signals, reference_signals, token_signals


@pytest.fixture(params=["tiny_lm", "tiny_mha_lm"])
def lm(request):
    return request.getfixturevalue(request.param)


def test_signals_match_reference(lm):
    torch.manual_seed(0)
    ids = torch.randint(0, len(lm.tokenizer), (300,))
    before = lm.model.config._attn_implementation
    got = token_signals(lm.model, [ids], block_size=64)[0]
    ref = reference_signals(lm.model, ids)
    torch.testing.assert_close(got.attention, ref.attention, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.self_information[1:], ref.self_information[1:], atol=1e-4, rtol=1e-4)
    assert torch.isnan(got.self_information[0])
    # each (layer, head) map's columns sum to the number of rows, so the mean map sums to n
    assert got.attention.sum().item() == pytest.approx(300, rel=1e-4)
    assert lm.model.config._attn_implementation == before  # restored after probing


def test_batch_with_padding_equals_single(lm):
    torch.manual_seed(1)
    seqs = [torch.randint(0, len(lm.tokenizer), (n,)) for n in (50, 173, 9)]
    batched = token_signals(lm.model, seqs)
    for seq, sig in zip(seqs, batched):
        alone = token_signals(lm.model, [seq])[0]
        torch.testing.assert_close(sig.attention, alone.attention, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sig.self_information[1:], alone.self_information[1:], atol=1e-4, rtol=1e-4)


def test_self_information_only(lm):
    torch.manual_seed(2)
    ids = torch.randint(0, len(lm.tokenizer), (40,))
    sig = token_signals(lm.model, [ids], attention=False)[0]
    assert sig.attention is None
    logits = lm.model(ids[None]).logits[0].float()
    expected = -torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1)
    torch.testing.assert_close(sig.self_information[1:], expected.detach(), atol=1e-4, rtol=1e-4)


def test_batched_signals_keeps_order_and_reports_progress(lm):
    torch.manual_seed(3)
    seqs = [torch.randint(0, len(lm.tokenizer), (n,)) for n in (30, 5, 80, 12, 31)]
    seen = []
    out = batched_signals(lm.model, seqs, batch_tokens=64, on_batch=seen.append)
    assert [len(s.attention) for s in out] == [30, 5, 80, 12, 31]
    assert sum(seen) == sum(len(s) for s in seqs)
    assert len(seen) > 1  # the budget forced several batches
    for seq, sig in zip(seqs, out):
        torch.testing.assert_close(sig.attention, token_signals(lm.model, [seq])[0].attention,
                                   atol=1e-5, rtol=1e-4)


def test_signals_from_the_last_rows_only(tiny_lm):
    """``last_rows=q``: the attention each key gets from the last q query rows, by direct definition."""
    torch.manual_seed(4)
    ids = torch.randint(0, len(tiny_lm.tokenizer), (90,))
    q = 12
    got = token_signals(tiny_lm.model, [ids], last_rows=[q])[0]
    with attention_implementation(tiny_lm.model, "eager"):
        out = tiny_lm.model(ids[None], output_attentions=True, use_cache=False)
    maps = torch.cat([a[0].float() for a in out.attentions])  # (layers*heads, n, n)
    expected = maps[:, -q:, :].sum(dim=(0, 1)) / maps.shape[0]
    torch.testing.assert_close(got.attention, expected.detach(), atol=1e-5, rtol=1e-4)
    # batched with another sequence, each keeps its own rows
    other = torch.randint(0, len(tiny_lm.tokenizer), (40,))
    both = token_signals(tiny_lm.model, [other, ids], last_rows=[5, q])
    torch.testing.assert_close(both[1].attention, got.attention, atol=1e-5, rtol=1e-4)
