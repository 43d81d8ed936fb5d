"""Token importance for eviction, from the prefill's own queries.

* window scores (SnapKV, PyramidKV, SpindleKV): attention of the last
  ``window`` prompt positions to every key, summed over those rows;
* accumulated scores (H2O): attention summed over *all* prompt queries;
* pooling over neighbouring keys, and the GQA choice between one decision per
  KV head (mean over its query heads) and one per query head.

* whole-unit ranking: tokens ordered by the score of the word they belong
  to, so a head keeps or evicts a number or a name as a whole.
* pooled ranking (AdaKV's budget allocation): every (head, token) pair of a
  layer in one order, so a head whose attention is concentrated keeps fewer
  tokens and one whose attention is spread keeps more.

All scores are float32 (b, heads, n); the window's own keys are scored too,
callers always keep them.
"""

from __future__ import annotations

import torch

NORMALIZE = ("sum", "position")  # how window scores are normalised (see window_scores)
UNITS = ("token", "word")  # what an eviction press keeps or evicts together
UNIT_SCORES = ("max", "mean")  # how a word's score comes from its tokens' scores


def window_scores(query: torch.Tensor, key: torch.Tensor, window: int, scaling: float,
                  normalize: str = "sum") -> torch.Tensor:
    """Attention of the last ``window`` queries to every key, summed over those queries.

    ``query`` (b, heads, n, d) and ``key`` (b, kv_heads, n, d) are post-RoPE.
    ``normalize="position"`` divides the score of key ``a`` by ``n - a``, the
    number of prompt positions that can attend to it (SpindleKV's paper form).
    """
    b, heads, n, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    w = min(window, n)
    q = query[:, :, n - w :].reshape(b, kv_heads, groups * w, d).float()
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (b, kv, g*w, n)
    scores = scores.view(b, heads, w, n)
    rows = torch.arange(n - w, n, device=query.device)[:, None]
    scores.masked_fill_(torch.arange(n, device=query.device)[None, :] > rows, float("-inf"))
    probs = torch.softmax(scores, dim=-1).sum(dim=2)  # (b, heads, n)
    if normalize == "position":
        probs = probs / torch.arange(n, 0, -1, device=query.device, dtype=probs.dtype)
    elif normalize != "sum":
        raise ValueError(f"normalize must be 'sum' or 'position', got {normalize!r}")
    return probs


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average over ``kernel`` neighbouring keys, so kept tokens come with their context."""
    if kernel <= 1:
        return scores
    b, h, n = scores.shape
    pooled = torch.nn.functional.avg_pool1d(scores.reshape(b * h, 1, n), kernel, stride=1, padding=kernel // 2)
    return pooled.view(b, h, -1)[..., :n]


def group_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """One score per KV head: the mean over the query heads that share it."""
    b, heads, n = scores.shape
    return scores.view(b, kv_heads, heads // kv_heads, n).mean(dim=2)


def unit_scores(scores: torch.Tensor, units: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Each token's unit's score (b, heads, n): the ``max`` or ``mean`` of its tokens' scores.

    ``units`` (n,) or (b, n) gives each token's unit (ascending from 0, a word for example).
    """
    if reduce not in UNIT_SCORES:
        raise ValueError(f"reduce must be one of {', '.join(UNIT_SCORES)}, got {reduce!r}")
    b, heads, n = scores.shape
    units = units.to(scores.device).expand(b, n)[:, None, :].expand(b, heads, n)
    count = int(units.max()) + 1
    unit = torch.zeros(b, heads, count, device=scores.device).scatter_reduce(
        2, units, scores.float(), "amax" if reduce == "max" else "mean", include_self=False)
    return unit.gather(2, units)


def by_unit(scores: torch.Tensor, units: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Scores (b, heads, n) re-expressed so that their order ranks whole units.

    ``units`` (n,) or (b, n) gives each token's unit (ascending from 0, a
    word for example). A unit's score is the ``max`` or ``mean`` of its
    tokens'; tokens are then ordered by their unit's score, and within a
    unit by their own. The result holds ranks (n for the best token, 1 for
    the worst), so any top-k keeps whole units and splits at most one: the
    last that only partly fits.
    """
    per_token_unit = unit_scores(scores, units, reduce)
    b, heads, n = scores.shape
    units = units.to(scores.device).expand(b, n)[:, None, :].expand(b, heads, n)
    scores = scores.float()
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # best token first
    # stable sorts: by unit (a unit's tokens together, best first; ties between units cannot
    # interleave them), then by the unit's score
    order = order.gather(2, torch.sort(units.gather(2, order), dim=-1, stable=True).indices)
    order = order.gather(2, torch.sort(per_token_unit.gather(2, order), dim=-1, descending=True,
                                       stable=True).indices)
    ranks = torch.empty_like(scores)
    return ranks.scatter_(2, order, torch.arange(n, 0, -1, device=scores.device, dtype=scores.dtype).expand_as(ranks))


def pooled_ranks(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Rank (0 best) of every entry of (heads, n) among all of them, by ``primary`` then ``secondary``,
    both descending; entries equal in both go token by token (all heads' entries of one token together).

    With ``normalize="sum"`` the window scores of every head sum to the
    same total (one per observation row; pooling loses a little at the
    edges), so they compare across heads: AdaKV (Feng et al., 2024) keeps a
    layer's top pairs rather than each head's top ``k``. ``primary`` is a
    token's score (its word's, for whole words) and ``secondary`` orders a
    head's tokens within ties; where, within each head, the two agree with
    the head's own order (a word's tokens share its score, ranked within
    it by ``secondary``), each head's kept tokens are a prefix of that order.
    """
    # token-major: ties that survive both keys (the window, scored inf) are shared out between heads
    flat_primary, flat_secondary = primary.T.flatten(), secondary.T.flatten()
    order = flat_secondary.argsort(descending=True, stable=True)
    order = order[flat_primary[order].argsort(descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks.view(primary.shape[1], primary.shape[0]).T
