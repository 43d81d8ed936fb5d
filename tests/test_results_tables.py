"""The README's standing table is read from a bench folder's summary and paired comparisons."""


from ctxpress.bench.stats import Interval, verdict

from conftest import load_benchmark


def load_script():
    return load_benchmark("results_tables")


def comparison(a, b, measure, mean, low, high, n=30):
    """An entry of comparisons.json, with the verdict the bench's report gives it."""
    decision = verdict(Interval(mean, low, high, n), measure)
    return {"task": "niah", "a": a, "b": b, "measure": measure, "mean": mean, "low": low, "high": high, "n": n,
            "verdict": decision}


def test_standing_marks_what_excludes_zero_and_what_was_not_run():
    tables = load_script()
    ref, snap, quant = "kv:snapkv-tiered@0.2:aware", "kv:snapkv@0.2:aware", "kv:quantized@0.2:aware"
    summary = [{"task": "niah", "config": c, "examples": 30} for c in ("full", ref, snap, quant)]
    comparisons = [
        comparison(ref, "full", "nll", 0.004, -0.009, 0.018),
        comparison(ref, snap, "nll", -2.1, -2.3, -1.9),
        comparison(snap, ref, "kl", 2.0, 1.8, 2.2),  # stored the other way round: negated
        comparison(ref, quant, "nll", -0.027, -0.071, 0.014),
        comparison(ref, quant, "kl", -0.024, -0.039, -0.011),
    ]
    lines = tables.standing(summary, comparisons, "snapkv-tiered", ["snapkv", "quantized", "streaming"],
                            ["0.2"]).splitlines()
    assert lines[2] == "| niah | aware | 20% | 30 | +0.004 | -2.100* / -2.000* | -0.027 / -0.024* | not run |"
    assert len([line for line in lines if line.startswith("| niah")]) == 1  # no agnostic rows were run


def test_too_few_pairs_decide_nothing_and_say_how_many():
    """Two needles whose interval excludes zero are not a verdict (the report needs 10 pairs)."""
    tables = load_script()
    ref, h2o = "kv:snapkv-tiered@0.2:aware", "kv:h2o@0.2:aware"
    summary = [{"task": "niah", "config": c, "examples": 30} for c in ("full", ref, h2o)]
    comparisons = [comparison(ref, "full", "nll", 0.004, -0.009, 0.018),
                   comparison(ref, h2o, "nll", -2.6, -2.7, -2.5, n=2),
                   comparison(ref, h2o, "kl", -2.5, -2.6, -2.4, n=2)]
    lines = tables.standing(summary, comparisons, "snapkv-tiered", ["h2o"], ["0.2"]).splitlines()
    assert lines[2] == "| niah | aware | 20% | 30 | +0.004 | -2.600 / -2.500 (n=2) |"
    assert tables.difference(comparisons, "niah", ref, h2o, "nll") == "-2.600 [-2.700, -2.500] (n=2)"
    comparisons[1] = comparison(ref, h2o, "nll", -2.6, -2.7, -2.5, n=10)
    assert tables.difference(comparisons, "niah", ref, h2o, "nll") == "**-2.600 [-2.700, -2.500]**"
