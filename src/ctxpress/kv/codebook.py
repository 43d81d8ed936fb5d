"""SpindleKV's per-prompt codebook of similar directions.

Vectors are stored as ``magnitude * codebook[index]`` with unit-norm codebook
entries. The codebook is built greedily on the similarity graph
``G = cos(x_i, x_j) > theta`` (diagonal included): repeatedly take the vector
with the most remaining neighbours, make *its* direction an entry (an
exemplar, not a mean) and point all its remaining neighbours at it. Every
vector therefore reconstructs with cosine similarity above ``theta`` and its
exact norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TILE = 512  # rows of the similarity matrix computed at once (a tile stays in cache)


@dataclass
class Codebook:
    """Codebook entries plus, for each encoded vector, its entry and norm."""

    entries: torch.Tensor  # (E, d) unit vectors, in the model's dtype
    index: torch.Tensor  # (N,) entry of every vector
    magnitude: torch.Tensor  # (N,) norm of every vector

    def decode(self) -> torch.Tensor:
        return self.entries[self.index] * self.magnitude[:, None].to(self.entries.dtype)


def normalise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors (float32) and norms of the rows of ``x``."""
    x = x.float()
    norm = x.norm(dim=-1)
    return x / norm.clamp_min(1e-12)[:, None], norm


def similarity_graph(units: torch.Tensor, theta: float) -> torch.Tensor:
    """Boolean (N, N) adjacency ``cos > theta``, computed in row tiles."""
    n = units.shape[0]
    graph = torch.empty(n, n, dtype=torch.bool, device=units.device)
    for start in range(0, n, TILE):
        graph[start : start + TILE] = (units[start : start + TILE] @ units.T) > theta
    graph.fill_diagonal_(True)  # a vector always matches itself, whatever the rounding
    return graph


def greedy_cover(graph: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exemplars and assignment from the greedy highest-degree cover of ``graph``.

    Returns ``(exemplars, assign)``: the vector index of every entry, in
    order of creation, and the entry of every vector. Ties go to the lowest
    index. Vectors left without any remaining neighbour become entries of
    their own in one step. The loop runs in NumPy: it is short per step and
    its per-call overhead is what dominates.
    """
    adjacency = graph.cpu().numpy()
    n = adjacency.shape[0]
    degree = adjacency.sum(axis=1, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    assign = np.full(n, -1, dtype=np.int64)
    exemplars: list[int] = []
    while True:
        best = int(np.argmax(degree))
        if degree[best] <= 1:
            break
        members = np.flatnonzero(adjacency[best] & alive)
        assign[members] = len(exemplars)
        exemplars.append(best)
        alive[members] = False
        degree -= adjacency[members].sum(axis=0, dtype=np.int64)  # symmetric: rows = columns
        degree[members] = 0  # removed nodes are never picked again
    singles = np.flatnonzero(alive)
    assign[singles] = np.arange(len(exemplars), len(exemplars) + len(singles))
    ids = np.concatenate([np.asarray(exemplars, dtype=np.int64), singles])
    return torch.from_numpy(ids).to(graph.device), torch.from_numpy(assign).to(graph.device)


def build(vectors: torch.Tensor, theta: float) -> Codebook:
    """Encode the rows of ``vectors`` (N, d) with a fresh greedy codebook."""
    units, norms = normalise(vectors)
    exemplars, assign = greedy_cover(similarity_graph(units, theta))
    return Codebook(units[exemplars].to(vectors.dtype), assign, norms.to(vectors.dtype))
