"""Paired bootstrap intervals and the comparisons a bench report draws from them."""

import numpy as np
import pytest

from ctxpress.bench import report
from ctxpress.bench.stats import MIN_PAIRED, bootstrap_mean, paired_difference, verdict


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_examples():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.normal(1.0, 1.0, 20))
    large = bootstrap_mean(rng.normal(1.0, 1.0, 2000))
    assert small.low < small.mean < small.high
    assert large.high - large.low < (small.high - small.low) / 5
    assert large.low < 1.0 < large.high
    assert bootstrap_mean([2.0, 2.0, 2.0]).low == bootstrap_mean([2.0, 2.0, 2.0]).high == 2.0
    assert bootstrap_mean([1.0, 3.0]) == bootstrap_mean([1.0, 3.0])  # fixed seed: reproducible tables


def test_paired_difference_uses_only_shared_examples():
    a = {"x": 1.0, "y": 2.0, "z": 5.0}
    b = {"x": 0.5, "y": 1.5, "w": 9.0}
    d = paired_difference(a, b)
    assert d.n == 2 and d.mean == pytest.approx(0.5) and d.low == pytest.approx(0.5)
    assert paired_difference({"x": 1.0}, {"y": 1.0}) is None


def test_verdict_knows_which_direction_is_better():
    lower = bootstrap_mean([-0.5, -0.4, -0.6, -0.5] * 3)
    assert verdict(lower, "nll") == "better" and verdict(lower, "survival") == "worse"
    noise = bootstrap_mean([-1.0, 1.0, -0.5, 0.5] * 3)
    assert not noise.excludes_zero and verdict(noise, "nll") == "tie"
    few = bootstrap_mean([-0.5] * (MIN_PAIRED - 1))  # no width, yet too few examples to say anything
    assert few.excludes_zero and verdict(few, "nll") == "tie"
    assert verdict(bootstrap_mean([-0.5, -0.4, -0.6] * 4), "nll") == "better"


def _rows(config, nlls, survival, budget_rate=0.5):
    return [{"task": "nq", "example": f"e{i}", "config": config, "family": "prompt" if config != "full" else
             "reference", "prompt_method": None if config == "full" else config.split("@")[0],
             "prompt_rate": None if config == "full" else budget_rate, "kv_method": "full", "kv_ratio": None,
             "score": 0.0, "nll": n, "survival": s, "kl": None, "token_rate": budget_rate, "byte_rate": 1.0,
             "peak_memory_bytes": 0} for i, (n, s) in enumerate(zip(nlls, survival))]


def test_comparisons_say_beats_only_where_the_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.5, 60)
    rows = (_rows("full", base - 1.0, [1.0] * 60) + _rows("good@0.5", base, [1.0] * 60)
            + _rows("bad@0.5", base + 0.5 + rng.normal(0, 0.1, 60), [1.0] * 30 + [0.0] * 30)
            + _rows("same@0.5", base + rng.normal(0, 0.3, 60), [1.0] * 60))
    paired = report.comparisons(rows)
    pairs = {(c["a"], c["b"], c["measure"]): c for c in paired}
    assert pairs[("good@0.5", "bad@0.5", "nll")]["verdict"] == "better"
    assert pairs[("good@0.5", "bad@0.5", "survival")]["verdict"] == "better"
    assert pairs[("good@0.5", "same@0.5", "nll")]["verdict"] == "tie"
    assert pairs[("good@0.5", "full", "nll")]["verdict"] == "worse"
    assert ("full", "good@0.5", "nll") not in pairs  # each pair once
    text = report.markdown(report.summarize(rows), paired)
    assert "**good@0.5** beats bad@0.5 on gold NLL" in text
    assert "**good@0.5** beats same@0.5" not in text and "**same@0.5** beats good@0.5" not in text
    assert "| good@0.5 |" in text and "[" in text  # intervals beside the means
