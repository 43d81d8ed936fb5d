"""Budgets, stage schedules and the choice of units to drop."""

import numpy as np
import pytest

from ctxpress.errors import InputError
from ctxpress.prompt.selection import auto_stages, resolve_target, select_drops, stage_targets


def test_resolve_target():
    assert resolve_target(1000, 0.5, None) == 500
    assert resolve_target(7, 0.5, None) == 4  # rounds half up
    assert resolve_target(10, 0.01, None) == 1  # never zero
    assert resolve_target(10, 1.0, None) == 10
    assert resolve_target(10, None, 3) == 3
    for rate, target in [(0, None), (1.5, None), (-0.1, None), (None, 0), (None, 11), (0.5, 3), (None, None)]:
        with pytest.raises(InputError):
            resolve_target(10, rate, target)


def test_auto_stages_follows_reference():
    assert [auto_stages(n) for n in (5, 99, 100, 453, 1499, 1500, 10_000)] == [1, 1, 1, 4, 14, 15, 15]


@pytest.mark.parametrize(
    "n,target,stages", [(453, 227, 4), (1000, 100, 10), (50, 49, 3), (2000, 1, 15), (5000, 4000, 2)]
)
def test_stage_targets_end_on_budget(n, target, stages):
    path = stage_targets(n, target, stages)
    assert len(path) == stages and path[-1] == target
    assert all(a >= b for a, b in zip([n, *path], path))
    # geometric: each stage removes about the same share of what is left
    # (where counts are large enough for rounding not to matter)
    expected = (target / n) ** (1 / stages)
    shares = [b / a for a, b in zip([n, *path], path) if a >= 100 and b > target]
    assert all(abs(s - expected) < 0.02 for s in shares)


def test_select_drops_lowest_scores_exact_quota():
    scores = np.array([5.0, 1.0, 4.0, 0.5, 3.0, 2.0])
    dropped = select_drops(scores, np.ones(6, int), np.ones(6, bool), 3, consecutive=False)
    assert set(np.flatnonzero(dropped)) == {1, 3, 5}


def test_consecutive_rule_applied_while_choosing():
    # lowest scores are neighbours 1, 2, 3: the rule keeps 2 and takes the next lowest instead
    scores = np.array([9.0, 0.1, 0.2, 0.3, 5.0, 0.9, 8.0])
    dropped = select_drops(scores, np.ones(7, int), np.ones(7, bool), 3, consecutive=True)
    assert set(np.flatnonzero(dropped)) == {1, 3, 5}
    assert not np.any(dropped[1:] & dropped[:-1])


def test_rule_relaxed_only_when_quota_needs_it():
    scores = np.arange(10, dtype=float)
    dropped = select_drops(scores, np.ones(10, int), np.ones(10, bool), 7, consecutive=True)
    assert dropped.sum() == 7  # more than half: the quota still holds


def test_protected_units_and_sizes():
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    sizes = np.array([1, 3, 1, 2, 1])
    droppable = np.array([False, True, True, True, True])
    dropped = select_drops(scores, sizes, droppable, 3, consecutive=False)
    assert not dropped[0]
    assert sizes[dropped].sum() == 3
    # only 2-token units left and one token to remove: overshoot by one
    dropped = select_drops(np.zeros(3), np.array([2, 2, 2]), np.ones(3, bool), 1, consecutive=False)
    assert dropped.sum() == 1


def test_line_breaks_are_a_second_tier():
    """A unit scored inf (a kept line break) goes only when no finite choice, swaps included, meets the quota."""
    scores = np.array([0.1, 0.2, 0.3, np.inf])
    sizes = np.array([2, 3, 1, 1])
    droppable = np.ones(4, dtype=bool)
    # the greedy walk drops 2 + 1 and is one short; the break would fit, but a swap (3 for 2) is exact
    assert select_drops(scores, sizes, droppable, 4, consecutive=False).tolist() == [False, True, True, False]
    finite = scores.copy()
    finite[3] = 0.9  # as an ordinary unit it is simply taken by the walk
    assert select_drops(finite, sizes, droppable, 4, consecutive=False).tolist() == [True, False, True, True]
    # when nothing finite can make the quota, the break goes rather than the budget
    assert select_drops(scores, sizes, droppable, 7, consecutive=False).tolist() == [True, True, True, True]
