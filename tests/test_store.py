"""Stores on their own: coded and dense columns, and the per-head visibility mask."""


import torch

from ctxpress.attention import bottom_right_attention
from ctxpress.kv import codebook as cb
from ctxpress.kv.store import ROOM, CodedColumns, DenseColumns


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
