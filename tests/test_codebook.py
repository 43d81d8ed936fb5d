"""The greedy codebook: reconstruction within its threshold, and the cover equal to the dense algorithm."""


import numpy as np
import pytest
import torch

from ctxpress.kv import codebook as cb


def test_codebook_reconstructs_within_threshold_and_merges_copies():
    torch.manual_seed(0)
    base = torch.randn(40, 16)
    near = base[:10] + 0.01 * torch.randn(10, 16)  # almost the same directions
    vectors = torch.cat([base, base[:5].clone(), near * 3.0])  # exact copies and scaled near-copies
    book = cb.build(vectors, 0.98)
    rebuilt = book.decode()
    cos = torch.nn.functional.cosine_similarity(rebuilt, vectors, dim=-1)
    assert torch.all(cos > 0.98 - 1e-6)
    torch.testing.assert_close(rebuilt.norm(dim=-1), vectors.norm(dim=-1))
    assert torch.equal(book.index[40:45], book.index[:5])  # exact copies share one entry
    assert book.entries.shape[0] <= 40  # copies and near-copies add no entries


def test_greedy_cover_takes_highest_degree_first():
    # star: node 2 is similar to all others, who are not similar to each other
    exemplars, assign = cb.greedy_cover(5, np.array([0, 1, 2, 2]), np.array([2, 2, 3, 4]))
    assert exemplars.tolist() == [2] and assign.tolist() == [0] * 5
    # a path 0-1-2 (1 has the most neighbours), then pairs in order of their lower node, then a single
    exemplars, assign = cb.greedy_cover(8, np.array([6, 1, 4, 1]), np.array([5, 0, 3, 2]))
    assert exemplars.tolist() == [1, 3, 5, 7] and assign.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]


def dense_algorithm_1(vectors: torch.Tensor, theta: float) -> tuple[list[int], list[int]]:
    """The paper's Algorithm 1, literally, on the full N x N graph (reference only)."""
    units = torch.nn.functional.normalize(vectors.double(), dim=-1)
    return dense_greedy((units @ units.T) > theta)


def dense_greedy(graph: torch.Tensor) -> tuple[list[int], list[int]]:
    """Algorithm 1's cover of a boolean adjacency matrix: one highest-degree pick at a time."""
    graph = graph.clone()
    graph.fill_diagonal_(True)
    exemplars, assign = [], [-1] * len(graph)
    while graph.any():
        best = int(graph.sum(dim=1).argmax())
        members = torch.nonzero(graph[best]).flatten()
        for m in members.tolist():
            assign[m] = len(exemplars)
        exemplars.append(best)
        graph[members, :] = False
        graph[:, members] = False
    return exemplars, assign


@pytest.mark.parametrize("seed", range(4))
def test_greedy_cover_equals_one_pick_at_a_time(seed):
    # small random graphs have many degree ties, several picks per degree level and leftover pairs
    rng = np.random.default_rng(seed)
    n = 60
    graph = torch.from_numpy(rng.random((n, n)) < 0.06)
    graph = torch.triu(graph, diagonal=1)
    rows, cols = (t.numpy() for t in torch.nonzero(graph, as_tuple=True))
    exemplars, assign = cb.greedy_cover(n, rows, cols)
    expected_exemplars, expected_assign = dense_greedy(graph | graph.T)
    assert exemplars.tolist() == expected_exemplars and assign.tolist() == expected_assign


@pytest.mark.parametrize("banded", [False, True], ids=["tiles", "banded"])
@pytest.mark.parametrize("theta", [0.9, 0.98])
def test_codebook_build_equals_the_dense_algorithm(theta, banded, monkeypatch):
    if banded:  # small sets skip the pruning by projection: force it, with several tiles
        monkeypatch.setattr(cb, "BANDED_FROM", 0)
        monkeypatch.setattr(cb, "BANDED_TILE", 32)
    else:
        monkeypatch.setattr(cb, "TILE", 64)
    torch.manual_seed(3)
    centres = torch.randn(12, 16, dtype=torch.float64)
    vectors = centres[torch.randint(0, 12, (300,))] + 0.15 * torch.randn(300, 16, dtype=torch.float64)
    book = cb.build(vectors, theta)
    exemplars, assign = dense_algorithm_1(vectors, theta)
    # the same cover, up to the order of the single-vector entries
    groups = {frozenset(torch.nonzero(book.index == e).flatten().tolist()) for e in range(len(book.entries))}
    expected = {frozenset(i for i, a in enumerate(assign) if a == e) for e in range(len(exemplars))}
    assert groups == expected
    assert 12 <= len(book.entries) < 300
