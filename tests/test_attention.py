"""The attention probe kernel: exact outputs and exact column sums."""

import pytest
import torch

from ctxpress.attention import attention_with_column_sums


def dense_reference(query, key, value, scaling, mask):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, 1)
    v = value.repeat_interleave(groups, 1)
    scores = query @ k.transpose(-1, -2) * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2), probs


def causal_mask(q_len, k_len):
    offset = k_len - q_len
    return torch.arange(k_len)[None, :] <= (torch.arange(q_len)[:, None] + offset)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("q_len,k_len", [(37, 37), (100, 100), (5, 40)])
@pytest.mark.parametrize("block", [16, 128])
def test_causal_output_and_column_sums(heads, kv_heads, q_len, k_len, block):
    torch.manual_seed(0)
    q = torch.randn(2, heads, q_len, 16) * 2
    k = torch.randn(2, kv_heads, k_len, 16) * 2
    v = torch.randn(2, kv_heads, k_len, 16)
    out, col = attention_with_column_sums(q, k, v, 0.25, block_size=block)
    ref_out, probs = dense_reference(q, k, v, 0.25, causal_mask(q_len, k_len))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(col, probs.sum(dim=(1, 2)), atol=1e-4, rtol=1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1),
        attn_mask=causal_mask(q_len, k_len), scale=0.25)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_row_mask_excludes_padding_rows():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    rows = torch.ones(2, 30, dtype=torch.bool)
    rows[1, 20:] = False
    _, col = attention_with_column_sums(q, k, v, 0.3, row_mask=rows, block_size=8)
    _, probs = dense_reference(q, k, v, 0.3, causal_mask(30, 30))
    expected = (probs * rows[:, None, :, None]).sum(dim=(1, 2))
    torch.testing.assert_close(col, expected, atol=1e-5, rtol=1e-5)
    # the padded sequence's real tokens get the same sums as alone
    _, alone = attention_with_column_sums(q[1:, :, :20], k[1:, :, :20], v[1:, :, :20], 0.3)
    torch.testing.assert_close(col[1, :20], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("boolean", [True, False])
def test_explicit_mask(boolean):
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mask = causal_mask(12, 12) & (torch.arange(12)[None, :] >= 3)  # first keys hidden (padding)
    mask[:3, :] = False  # rows with nothing to attend to
    given = mask[None, None] if boolean else torch.where(mask, 0.0, float("-inf"))[None, None]
    out, col = attention_with_column_sums(q, k, v, 0.5, attention_mask=given, block_size=5)
    ref_out, probs = dense_reference(q, k, v, 0.5, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(col, probs.sum(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    assert torch.all(col[0, :3] == 0)


def test_per_head_column_sums():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 6, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    _, col = attention_with_column_sums(q, k, v, 0.4, block_size=7, per_head=True)
    _, probs = dense_reference(q, k, v, 0.4, causal_mask(20, 20))
    torch.testing.assert_close(col, probs.sum(dim=2), atol=1e-5, rtol=1e-5)
