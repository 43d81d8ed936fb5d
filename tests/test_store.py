"""Stores on their own: coded and dense columns, the per-head visibility mask, and predicted bytes."""

import pytest
import torch

from ctxpress.attention import bottom_right_attention
from ctxpress.kv import codebook as cb
from ctxpress.kv.stores import (
    ROOM,
    CodedColumns,
    CodedKeys,
    DenseColumns,
    DenseStore,
    HeadwiseStore,
    QuantizedColumns,
    QuantizedStore,
    TieredStore,
)
from ctxpress.kv.stores.coded import GROUP_TAG, POSITION, index_dtype


def test_coded_columns_match_or_get_new_entries():
    torch.manual_seed(1)
    book = cb.build(torch.randn(8, 16), 0.95)
    tags = torch.zeros(len(book.entries), dtype=torch.int8)
    coded = CodedColumns(book.entries, tags, book.index[None].int(), book.magnitude[None], 0.95)
    index, _ = coded.encode(book.decode()[:2] * 2, torch.zeros(2, dtype=torch.long))
    assert index.tolist() == book.index[:2].tolist()  # same directions, same group: matched
    assert len(coded.entries) == len(book.entries)
    loose = torch.randn(3, 16)
    vectors = torch.cat([loose, book.decode()[:1]])
    index, magnitude = coded.encode(vectors, torch.tensor([0, 0, 0, 1]))
    # the loose rows of group 0 and the row of group 1 (whose codebook was empty) got entries
    assert len(coded.entries) > len(book.entries) and coded.entry_group.tolist().count(1) == 1
    assert coded.entry_group[index.long()].tolist() == [0, 0, 0, 1]
    rebuilt = coded.entries[index.long()] * magnitude[:, None]
    assert torch.all(torch.nn.functional.cosine_similarity(rebuilt, vectors, dim=-1) > 0.95)
    torch.testing.assert_close(rebuilt.norm(dim=-1), vectors.norm(dim=-1))


def test_dense_columns_fill_reserved_room_before_growing():
    torch.manual_seed(5)
    part = DenseColumns(torch.randn(2, 10, 8))
    expected = [part.materialize().clone()]
    buffers = []
    for step in range(ROOM + 2):
        new = torch.randn(2, 1, 8)
        part.append(new, 10 + step)
        expected.append(new)
        buffers.append(part.buffer.data_ptr())
        torch.testing.assert_close(part.materialize(), torch.cat(expected, dim=1), rtol=0, atol=0)
    # grown once for the first token (with ROOM to spare), again only when that room ran out
    assert len(set(buffers[: ROOM + 1])) == 1 and buffers[ROOM + 1] != buffers[ROOM]
    assert part.nbytes() == part.buffer.numel() * 4 and len(part) == 10 + ROOM + 2


def test_visible_mask_equals_attending_to_each_heads_own_tokens():
    torch.manual_seed(4)
    heads, kv_heads, columns, d = 6, 2, 20, 8
    query = torch.randn(1, heads, 3, d)
    key, value = torch.randn(1, kv_heads, columns, d), torch.randn(1, kv_heads, columns, d)
    visible = torch.rand(heads, columns) < 0.6
    visible[:, -3:] = True  # the three new tokens, seen by every head
    out = bottom_right_attention(query, key, value, 0.3, visible)
    for h in range(heads):
        g = h // (heads // kv_heads)
        own = torch.nonzero(visible[h]).flatten()  # this head's tokens, the new ones last
        k, v = key[0, g, own], value[0, g, own]
        weights = (query[0, h] @ k.T * 0.3).masked_fill(
            torch.arange(len(own))[None, :] > torch.arange(3)[:, None] + len(own) - 3, float("-inf")).softmax(-1)
        torch.testing.assert_close(out[0, :, h], weights @ v)


def coded_part(cls, kv_heads: int, columns: int, entries: int, dim: int, dtype: torch.dtype):
    """A coded part as SpindleKV builds one: ``entries`` entries over the groups, one index per column."""
    book = torch.nn.functional.normalize(torch.randn(entries, dim), dim=-1).to(dtype)
    tags = (torch.arange(entries) % kv_heads).to(GROUP_TAG)
    index = torch.randint(0, entries, (kv_heads, columns)).to(index_dtype(entries))
    magnitude = torch.rand(kv_heads, columns).to(dtype)
    if cls is CodedKeys:
        positions = torch.arange(columns, dtype=POSITION).expand(kv_heads, columns)
        return CodedKeys(book, tags, index, magnitude, 0.9, 64, positions=positions, rotary=None)
    return CodedColumns(book, tags, index, magnitude, 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,kv_heads,n,dim", [(1, 2, 37, 16), (2, 3, 64, 8), (1, 1, 1, 32)])
def test_each_store_predicts_its_bytes(dtype, batch, kv_heads, n, dim):
    """``nbytes_for`` of every store and part equals ``nbytes()`` of a fresh one: presses size their
    budgets by it, so a byte ratio is met exactly."""
    torch.manual_seed(n)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    keys, values = torch.randn(batch, kv_heads, n, dim).to(dtype), torch.randn(batch, kv_heads, n, dim).to(dtype)
    dense = DenseStore(keys, values)
    assert dense.nbytes() == DenseStore.nbytes_for(batch, kv_heads, n, dim, itemsize)
    rows = batch * kv_heads
    assert DenseColumns(keys).nbytes() == DenseColumns.nbytes_for(rows, n, dim, itemsize)
    for bits in (8, 4, 2):
        for group in (1, 8, 64):
            for per_channel in (True, False):
                part = QuantizedColumns(keys, bits, group, per_channel)
                assert part.nbytes() == QuantizedColumns.nbytes_for(rows, n, dim, bits, group, per_channel)
            store = QuantizedStore(keys, values, bits, group)
            assert store.nbytes() == QuantizedStore.nbytes_for(batch, kv_heads, n, dim, bits, group)
            tiered = TieredStore(dense, store)
            assert tiered.nbytes() == TieredStore.nbytes_for(dense.nbytes(), store.nbytes())
    for entries in (1, 5, 40):
        for cls in (CodedColumns, CodedKeys):
            part = coded_part(cls, kv_heads, n, entries, dim, dtype)
            assert part.nbytes() == cls.nbytes_for(entries, kv_heads * n, dim, itemsize)
    selectors = 2 * kv_heads
    visible = torch.rand(selectors, n) < 0.5
    key_part, value_part = coded_part(CodedKeys, kv_heads, n, 7, dim, dtype), DenseColumns(values[0])
    headwise = HeadwiseStore(key_part, value_part, visible)
    assert headwise.nbytes() == HeadwiseStore.nbytes_for(selectors, n, key_part.nbytes(), value_part.nbytes())
