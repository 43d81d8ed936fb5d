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

import math
from dataclasses import dataclass

import numpy as np
import torch

TILE = 512  # rows of the similarity matrix computed at once
BANDED_FROM = 1024  # vectors from which pruning by projection pays for its sort
BANDED_TILE = 256  # narrower tiles follow the band more closely


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


def similar_pairs(units: torch.Tensor, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i != j``, of unit vectors with ``cos > theta``: the graph's edges.

    The graph is symmetric, so each pair is found once, from tiles on and
    above the diagonal. At SpindleKV's thresholds it is sparse, so its edges
    are kept, not an N x N matrix. Larger sets are pruned, exactly:
    ``cos > theta`` means the two vectors are closer than
    ``sqrt(2 - 2 theta)``, so their projections on any unit direction are
    too; sorted by the projection on their principal direction, a tile's
    only candidates are one band of columns.
    """
    n = units.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order, band_ends, tile = None, None, TILE
    if n > BANDED_FROM:
        projection, order = (units @ _principal_direction(units)).sort()
        units = units[order]
        reach = math.sqrt(max(0.0, 2.0 - 2.0 * theta)) + 1e-3  # margin for rounding in norms and products
        band_ends = torch.searchsorted(projection, projection + reach).tolist()
        tile = BANDED_TILE
    if order is not None:
        order = order.cpu().numpy()
    rows, cols = [], []
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        end = n if band_ends is None else band_ends[stop - 1]
        block = units[start:stop] @ units[start:end].T  # rows start.., columns start..
        i, j = _above(block, theta)
        above = j > i
        i, j = i[above] + start, j[above] + start
        rows.append(i if order is None else order[i])
        cols.append(j if order is None else order[j])
    return np.concatenate(rows), np.concatenate(cols)


def _above(block: torch.Tensor, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of every entry of ``block`` above ``theta``.

    On the CPU NumPy's comparison and ``flatnonzero`` take about a third of
    the time of ``torch.nonzero(block > theta)``, which made up 40% of the
    graph's cost next to the matrix products.
    """
    if block.device.type == "cpu":
        return np.divmod(np.flatnonzero(block.detach().numpy() > theta), block.shape[1])
    i, j = torch.nonzero(block > theta, as_tuple=True)
    return i.cpu().numpy(), j.cpu().numpy()


def _principal_direction(units: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """An approximation of the vectors' first principal direction, by power iteration.

    Any unit direction keeps :func:`similar_pairs` exact; a good one makes its bands narrow.
    """
    centred = units - units.mean(dim=0)
    covariance = centred.T @ centred
    direction = covariance.abs().sum(dim=1)  # non-zero start, leaning towards the widest coordinates
    for _ in range(steps):
        direction = covariance @ direction
        direction = direction / direction.norm().clamp_min(1e-30)
    return direction


def greedy_cover(n: int, rows: np.ndarray, cols: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Exemplars and assignment from the greedy highest-degree cover of a graph on ``n`` nodes.

    The graph is given by its edges ``(rows[k], cols[k])`` and always links
    a node to itself. Returns ``(exemplars, assign)``: the node of every
    entry, in order of creation, and the entry of every node. Ties go to the
    lowest index. Degrees are updated from adjacency lists, so the cover
    costs the number of edges, not ``n`` squared, and once per degree
    level rather than once per pick. Two phases need no step by step
    search: once no node has more than one remaining neighbour the
    remaining edges are disjoint pairs, taken in order of their lower node,
    and nodes left alone become entries of their own.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    source, target = np.concatenate([rows, cols]), np.concatenate([cols, rows])
    # the order within a node's list does not matter; 16-bit keys get NumPy's radix sort, 4x faster
    order = np.argsort(source.astype(np.uint16) if n <= 1 << 16 else source, kind="stable")
    neighbours = target[order]
    start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(source, minlength=n), out=start[1:])
    degree = np.diff(start) + 1  # neighbours plus the node itself
    alive = np.ones(n, dtype=bool)
    assign = np.full(n, -1, dtype=np.int64)
    picked: list[int] = []
    top = int(degree.max())
    while top > 2:
        # Degrees only fall, so the nodes of the highest degree that no earlier pick of this
        # level has touched are, lowest index first, exactly the picks one at a time would make.
        # A level is taken in one pass over its candidates, and degrees are updated once.
        removed = []
        for node in np.flatnonzero(degree == top).tolist():
            near = neighbours[start[node] : start[node + 1]]
            live = near[alive[near]]
            if not alive[node] or len(live) + 1 < top:
                continue  # touched by a pick of this level: its degree has fallen
            members = np.append(live, node)
            assign[members] = len(picked)
            picked.append(node)
            alive[members] = False
            removed.append(members)
        removed = np.concatenate(removed)
        np.subtract.at(degree, _adjacent(start, neighbours, removed), 1)
        degree[removed] = 0  # removed nodes are never picked again
        top = int(degree.max())
    exemplars, count = [np.array(picked, dtype=np.int64)], len(picked)
    if top == 2:  # a matching is left: each pair's lower node is its exemplar
        lower = np.flatnonzero(degree == 2)
        partner = _adjacent(start, neighbours, lower)
        owner = np.repeat(lower, start[lower + 1] - start[lower])
        owner, partner = owner[alive[partner]], partner[alive[partner]]
        pairs = owner < partner
        owner, partner = owner[pairs], partner[pairs]
        entries = np.arange(count, count + len(owner))
        assign[owner], assign[partner] = entries, entries
        exemplars.append(owner)
        count += len(owner)
        alive[owner], alive[partner] = False, False
    singles = np.flatnonzero(alive)
    assign[singles] = np.arange(count, count + len(singles))
    ids = np.concatenate([*exemplars, singles]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(assign)


def _adjacent(start: np.ndarray, neighbours: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The neighbours of all ``nodes``, concatenated (one entry per edge)."""
    first, count = start[nodes], start[nodes + 1] - start[nodes]
    before = np.cumsum(count) - count
    return neighbours[np.arange(int(count.sum())) + np.repeat(first - before, count)]


def build(vectors: torch.Tensor, theta: float) -> Codebook:
    """Encode the rows of ``vectors`` (N, d) with a fresh greedy codebook."""
    units, norms = normalise(vectors)
    exemplars, assign = greedy_cover(units.shape[0], *similar_pairs(units, theta))
    exemplars, assign = exemplars.to(units.device), assign.to(units.device)
    return Codebook(units[exemplars].to(vectors.dtype), assign, norms.to(vectors.dtype))
