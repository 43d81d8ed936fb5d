"""The one budget search: the largest count that fits, the first option that fits."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctxpress.kv.budget import first_fitting, largest_fitting


@given(costs=st.lists(st.integers(0, 50), min_size=1, max_size=40).map(sorted), target=st.integers(0, 60))
def test_largest_fitting_finds_the_largest_count_under_a_monotone_cost(costs, target):
    fitting = [x for x in range(1, len(costs) + 1) if costs[x - 1] <= target]
    for top_first in (False, True):
        found = largest_fitting(lambda x: costs[x - 1], 1, len(costs), target, top_first=top_first)
        assert found == (max(fitting) if fitting else None)


def test_largest_fitting_probes_in_a_fixed_order():
    """Costs of stored selections are not quite monotone: the answer is where the probes land."""
    costs = {1: 0, 2: 0, 3: 9, 4: 0}  # 3 is over the target, 4 is not
    probes = []

    def cost(x):
        probes.append(x)
        return costs[x]

    assert largest_fitting(cost, 1, 4, 5) == 2 and probes == [1, 3, 2]
    probes.clear()
    assert largest_fitting(cost, 1, 4, 5, top_first=True) == 4 and probes == [1, 4]
    assert largest_fitting(lambda x: 10, 1, 4, 5, top_first=True) is None


@pytest.mark.parametrize("target,chosen", [(100, 8), (50, 4), (25, 2), (10, None)])
def test_first_fitting_takes_the_preferred_option_that_fits(target, chosen):
    assert first_fitting(lambda bits: 10 * bits, (8, 4, 2), target) == chosen
