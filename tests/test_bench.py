"""The evaluation harness on a tiny model and a small synthetic copy of the data formats."""

import gzip
import json
import uuid

import pytest
import torch

from ctxpress.bench import report
from ctxpress.bench.catalog import TASKS
from ctxpress.bench.data import find_data_dir
from ctxpress.bench.metrics import (
    answer_survives,
    best_subspan_em,
    contains_exactly,
    mean_kl,
    mean_nll,
    normalize_answer,
)
from ctxpress.bench.profiles import Config, Profile, profile
from ctxpress.bench.runner import LOCK, RESULTS, Runner
from ctxpress.bench.synthetic import CommonWords, MultiKeyNeedle, VariableTracking
from ctxpress.bench.tasks import NQ, KVRetrieval, NeedleInHaystack, split_indices
from ctxpress.cli import main
from ctxpress.errors import InputError
from ctxpress.jsonl import read_records

WORDS = [
    "river", "stone", "light", "garden", "paper", "window", "silver", "morning", "quiet",
    "number", "letter", "music", "harbor", "forest", "engine", "market", "winter", "travel",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Files in the formats of ../shared/data, written here (small and deterministic)."""
    root = tmp_path_factory.mktemp("data")
    nq = []
    for i in range(12):
        answer = f"Person{i}"
        text = f"{' '.join(WORDS[(i + k) % len(WORDS)] for k in range(30))}. The answer to item {i} is {answer}."
        nq.append({"question": f"who is item {i}", "answers": [answer],
                   "ctxs": [{"title": f"Title {i}", "text": text, "hasanswer": True, "isgold": True}]})
    with gzip.open(root / "nq-open-oracle.dev.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in nq)
    kv = []
    for i in range(5):
        records = [[str(uuid.UUID(int=1000 * i + k)), str(uuid.UUID(int=99999 + 1000 * i + k))] for k in range(20)]
        kv.append({"ordered_kv_records": records, "key": records[7][0], "value": records[7][1]})
    with gzip.open(root / "kv-retrieval-75_keys.dev.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in kv)
    (root / "pg-essays").mkdir()
    for i in range(3):
        sentences = [" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(12)).capitalize() + "." for j in range(60)]
        (root / "pg-essays" / f"essay{i}.txt").write_text(" ".join(sentences))
    return root


def test_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert best_subspan_em("It was the Eiffel Tower, in Paris.", ["eiffel tower"]) == 1.0
    assert best_subspan_em("It was Paris.", ["Eiffel Tower"]) == 0.0
    assert contains_exactly("value: ab-12", ["ab-12"]) == 1.0 and contains_exactly("AB-12", ["ab-12"]) == 0.0
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 2]) / 2
    assert mean_nll(logits, targets) == pytest.approx(float(expected))
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-7)
    assert mean_kl(logits, logits.flip(0)) > 0


def test_nq_examples(data_dir):
    examples = NQ(documents=4, gold_positions=(0, 3)).examples(data_dir, 4, seed=0, split="dev")
    again = NQ(documents=4, gold_positions=(0, 3)).examples(data_dir, 4, seed=0, split="dev")
    assert [e.documents for e in examples] == [e.documents for e in again]  # deterministic
    for i, example in enumerate(examples):
        position = (0, 3)[i % 2]
        assert len(example.documents) == 4
        assert example.documents[position].startswith(f"Document [{position + 1}](Title: Title {i})")
        others = [d for k, d in enumerate(example.documents) if k != position]
        assert not any(f"Person{i}" in d for d in others)  # distractors never hold the answer
        assert example.question.startswith(f"Question: who is item {i}") and example.answers == [f"Person{i}"]


def test_dev_and_report_splits_are_disjoint(data_dir, tokenizer):
    assert list(split_indices(12, "dev")) == list(range(6)) and list(split_indices(12, "report")) == list(range(6, 12))
    for task in (NQ(documents=3), KVRetrieval(pairs=4), NeedleInHaystack(lengths=(200,), depths=(0.5,))):
        dev = task.examples(data_dir, 50, seed=0, tokenizer=tokenizer, split="dev")
        report_ = task.examples(data_dir, 50, seed=0, tokenizer=tokenizer, split="report")
        assert dev and report_
        assert not {e.question + e.answers[0] for e in dev} & {e.question + e.answers[0] for e in report_}
        assert not {e.context for e in dev} & {e.context for e in report_}
    with pytest.raises(ValueError, match="unknown split"):
        split_indices(12, "test")


def test_answer_survival():
    assert answer_survives("Document [1] It was the Eiffel Tower!", ["the eiffel tower", "Paris"]) == 1.0
    assert answer_survives("It was the Eiffel.", ["Eiffel Tower"]) == 0.0
    assert answer_survives("number is 12345 67.", ["1234567"]) == 0.0  # a shredded number is lost


def test_kv_examples_keep_gold_at_relative_position(data_dir):
    example = KVRetrieval(pairs=6).examples(data_dir, 1, seed=0, split="dev")[0]
    pairs = json.loads(example.context.removeprefix("JSON data:\n"))
    key = example.question.split('"')[1]
    assert len(pairs) == 6 and pairs[key] == example.answers[0]
    assert list(pairs).index(key) == example.meta["gold_position"] == round(7 * 5 / 19)


def test_niah_examples(data_dir, tokenizer):
    task = NeedleInHaystack(lengths=(200, 400), depths=(0.2, 0.8))
    examples = task.examples(data_dir, 4, seed=0, tokenizer=tokenizer)
    for example in examples:
        text = example.context
        number = example.answers[0]
        at = text.index(f"The special magic number is {number}.")
        assert abs(at / len(text) - example.meta["depth"]) < 0.15
        tokens = len(tokenizer(text)["input_ids"])
        assert abs(tokens - example.meta["length"]) < 30


def tiny_profile():
    return Profile(
        "test",
        {"nq": (NQ(documents=3, gold_positions=(1,)), 2), "kv-retrieval": (KVRetrieval(pairs=4), 1)},
        prompt_methods=("dac", "random"), prompt_rates=(0.5,), kv_methods=("snapkv", "spindlekv"),
        kv_ratios=(0.5,), combos=(Config("dac", 0.5, "snapkv", 0.5),), max_new_tokens=4,
    )


def test_runner_rows_resume_and_report(tmp_path, data_dir, tiny_lm):
    out = tmp_path / "run"
    runner = Runner(tiny_lm, tiny_profile(), data_dir, out, progress=False)
    path = runner.run()
    rows = read_records(path)
    configs = [c.label for c in tiny_profile().configs()]
    assert len(rows) == 3 * len(configs) == 3 * 6
    assert {r["config"] for r in rows} == set(configs)
    for row in rows:
        assert row["score"] in (0.0, 1.0) and row["nll"] > 0
        assert (row["kl"] is None) == (row["kv_method"] == "full")
        if row["kv_method"] != "full":
            assert row["kl"] >= 0 and row["byte_rate"] <= 0.5
        if row["prompt_method"]:
            assert abs(row["kept_tokens"] - round(0.5 * row["context_tokens"])) <= 1
    assert any(r["kl"] > 1e-6 for r in rows if r["kv_method"] != "full")  # the reference is not the row itself
    # an interrupted run (last rows lost, one line cut) resumes without redoing the rest
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:20])
    Runner(tiny_lm, tiny_profile(), data_dir, out, progress=False).run()
    resumed = read_records(path)
    assert len(resumed) == len(rows)
    assert [r["key"] for r in resumed[: len(lines) - 4]] == [r["key"] for r in rows[: len(lines) - 4]]
    # the redone rows (one of them without its group's full row, so with a rebuilt reference) match the first run
    redone = {r["key"]: r for r in resumed[len(lines) - 4 :]}
    assert set(redone) == {r["key"] for r in rows[len(lines) - 4 :]}
    for row in rows[len(lines) - 4 :]:
        again = redone[row["key"]]
        assert again["answer"] == row["answer"] and again["score"] == row["score"]
        assert again["nll"] == pytest.approx(row["nll"], rel=1e-5)
        assert (again["kl"] is None) == (row["kl"] is None)
        if row["kl"] is not None:
            assert again["kl"] == pytest.approx(row["kl"], rel=1e-4, abs=1e-6)
    summary = report.write(resumed, out)
    assert len(summary) == 2 * len(configs)
    assert (out / "summary.md").read_text().count("| full |") == 3  # the overview and one table per task
    assert (out / "quality_vs_compression.png").stat().st_size > 1000


@pytest.mark.skipif(__import__("os").name != "posix", reason="flock")
def test_two_runs_never_write_one_folder(tmp_path, data_dir, tiny_lm):
    import fcntl

    profile_ = Profile("test", {"kv-retrieval": (KVRetrieval(pairs=4), 1)}, prompt_methods=(), kv_methods=(),
                       max_new_tokens=2)
    with (tmp_path / LOCK).open("w") as other:  # another run holds the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another ctxpress bench is writing to"):
            Runner(tiny_lm, profile_, data_dir, tmp_path, progress=False).run()
        assert not (tmp_path / RESULTS).exists()
    assert len(read_records(Runner(tiny_lm, profile_, data_dir, tmp_path, progress=False).run())) == 1


def test_resume_refuses_results_of_another_run(tmp_path, data_dir, tiny_lm):
    profile_ = Profile("test", {"kv-retrieval": (KVRetrieval(pairs=4), 1)}, prompt_methods=(), kv_methods=(),
                       max_new_tokens=2)
    Runner(tiny_lm, profile_, data_dir, tmp_path, progress=False).run()
    with pytest.raises(InputError, match="another run"):
        Runner(tiny_lm, profile_, data_dir, tmp_path, seed=1, progress=False).run()
    assert len(read_records(tmp_path / RESULTS)) == 1  # nothing discarded


def test_overview_averages_across_tasks():
    def entry(task, config, score, nll, kl, kept):
        return {"task": task, "config": config, "score": score, "nll": nll, "kl": kl, "kept": kept}

    summary = [entry("nq", "full", 1.0, 2.0, None, 1.0), entry("niah", "full", 0.5, 4.0, None, 1.0),
               entry("nq", "kv:snapkv@0.5", 0.25, 3.0, 0.1, 0.5), entry("niah", "kv:snapkv@0.5", 0.0, 5.0, 0.3, 0.4)]
    lines = report.overview(summary).splitlines()
    assert lines[0] == "| configuration | nq score | niah score | gold NLL | answer survival | KL vs full | kept |"
    assert lines[2] == "| full | 1.00 | 0.50 | 3.000 | - | - | 1.00 |"  # entries without survival: older runs
    assert lines[3] == "| kv:snapkv@0.5 | 0.25 | 0.00 | 4.000 | - | 0.200 | 0.45 |"


def test_runs_are_deterministic(tmp_path, data_dir, tiny_lm):
    a = read_records(Runner(tiny_lm, tiny_profile(), data_dir, tmp_path / "a", progress=False).run())
    b = read_records(Runner(tiny_lm, tiny_profile(), data_dir, tmp_path / "b", progress=False).run())
    assert [r["nll"] for r in a] == pytest.approx([r["nll"] for r in b])
    assert [r["answer"] for r in a] == [r["answer"] for r in b]


def test_data_dir_errors(tmp_path):
    with pytest.raises(InputError, match="--data-dir"):
        find_data_dir(tmp_path, ["nq"])
    with pytest.raises(InputError, match="unknown profile"):
        profile("huge")


def test_cli_bench(tmp_path, data_dir, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    code = main(["bench", "--tasks", "kv-retrieval", "--examples", "1", "--data-dir", str(data_dir), "--out",
                 str(out), "--model", tiny_model_dir, "--no-plots"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "### kv-retrieval" in captured.out and "| full |" in captured.out
    assert len(read_records(out / RESULTS)) == len(profile("quick").configs())
    code = main(["bench", "--ratios", "0.5,1.5", "--data-dir", str(data_dir)])
    assert code == 2 and "kept fraction in (0, 1], got '1.5'" in capsys.readouterr().err
    code = main(["bench", "--tasks", "kv-retrieval,poetry", "--data-dir", str(data_dir)])
    assert code == 2 and "unknown task poetry" in capsys.readouterr().err
    code = main(["bench", "--data-dir", str(tmp_path / "nothing"), "--model", tiny_model_dir])
    assert code == 2 and "--data-dir" in capsys.readouterr().err


def test_cli_bench_report_only_rewrites_the_summary_without_running(tmp_path, data_dir, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    assert main(["bench", "--tasks", "kv-retrieval", "--examples", "1", "--data-dir", str(data_dir), "--out",
                 str(out), "--model", tiny_model_dir, "--no-plots"]) == 0
    rows = (out / RESULTS).read_text()
    (out / "summary.md").unlink()
    capsys.readouterr()
    # no model, no data: neither is loaded
    code = main(["bench", "--report-only", "--out", str(out), "--model", str(tmp_path / "no-model"),
                 "--data-dir", str(tmp_path / "no-data"), "--no-plots"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "### kv-retrieval" in captured.out and (out / "summary.md").read_text() in captured.out
    assert (out / RESULTS).read_text() == rows
    code = main(["bench", "--report-only", "--out", str(tmp_path / "empty")])
    assert code == 2 and "no results to report" in capsys.readouterr().err
    code = main(["bench", "--report-only", "--fresh", "--out", str(out)])
    assert code == 2 and "--fresh would discard them" in capsys.readouterr().err
    assert (out / RESULTS).read_text() == rows


def test_rows_of_a_shared_prefill_equal_rows_of_their_own(tmp_path, data_dir, tiny_lm, monkeypatch):
    """Presses of different needs (tokens, words, attention sums), in both settings, interleaved: every
    row equals the row of a run where its method is alone (so each setting's prefill is its own)."""
    import ctxpress.kv.generation as generation

    prefills = []

    class Counted(generation.SharedPrefill):
        def __init__(self, presses):
            super().__init__(presses)
            prefills.append([press.name for press in presses])

    monkeypatch.setattr(generation, "SharedPrefill", Counted)
    methods = ("snapkv", "snapkv-words", "h2o", "quantized", "snapkv-tiered")
    grid = Profile("shared", {"kv-retrieval": (KVRetrieval(pairs=4), 1)}, prompt_methods=(), kv_methods=methods,
                   kv_ratios=(0.3,), kv_settings=("agnostic", "aware"), max_new_tokens=3)
    together = {r["key"]: r for r in read_records(Runner(tiny_lm, grid, data_dir, tmp_path / "all",
                                                         progress=False).run())}
    assert len(together) == 1 + 2 * len(methods)
    # one prefill per setting and need: tokens (with the full reference, agnostic), words, attention sums
    assert sorted(prefills) == sorted([["full", "snapkv", "quantized"], ["snapkv-words", "snapkv-tiered"], ["h2o"],
                                       ["snapkv", "quantized"], ["snapkv-words", "snapkv-tiered"], ["h2o"]])
    for method in methods:
        alone = Runner(tiny_lm, grid.only([method]), data_dir, tmp_path / method, progress=False).run()
        for row in read_records(alone):
            shared = together[row["key"]]
            assert (shared["answer"], shared["nll"], shared["kl"], shared["cache_bytes"]) == \
                (row["answer"], row["nll"], row["kl"], row["cache_bytes"])


def test_question_aware_rows_score_the_same_answer_tokens(tmp_path, data_dir, tiny_lm):
    """A press that keeps everything gives the full context's answer logits in both settings, so the
    question-aware rows are aligned on the same answer tokens (KL ~ 0, same NLL)."""
    grid = Profile("aware", {"nq": (NQ(documents=3, gold_positions=(1,)), 2)}, prompt_methods=(),
                   kv_methods=("snapkv",), kv_ratios=(1.0,), kv_settings=("agnostic", "aware"), max_new_tokens=3)
    assert [c.label for c in grid.configs()] == ["full", "kv:snapkv@1", "kv:snapkv@1:aware"]
    rows = read_records(Runner(tiny_lm, grid, data_dir, tmp_path, progress=False).run())
    by = {(r["example"], r["config"]): r for r in rows}
    for example in {r["example"] for r in rows}:
        full = by[(example, "full")]
        for label in ("kv:snapkv@1", "kv:snapkv@1:aware"):
            assert by[(example, label)]["kl"] == pytest.approx(0.0, abs=1e-5)
            assert by[(example, label)]["nll"] == pytest.approx(full["nll"], rel=1e-4)
            assert by[(example, label)]["answer"] == full["answer"]
    assert {r["kv_setting"] for r in rows} == {"agnostic", "aware"}


def test_profile_restricted_to_methods():
    grid = profile("prompt").only(["dac-static", "random"])
    assert {c.prompt_method for c in grid.configs()} == {None, "dac-static", "random"}
    assert len(grid.configs()) == 1 + 2 * 2  # full, two methods at two rates
    with pytest.raises(InputError, match="no method snapkv"):
        profile("prompt").only(["snapkv"])
    kv = profile("kv")
    assert len(kv.configs()) == 1 + 9 * 3 * 2
    assert {"quantized", "snapkv-words", "snapkv-tiered", "spindlekv-words"} <= set(kv.kv_methods)
    assert sum(count for _, count in kv.tasks.values()) >= 160
    assert kv.only(["snapkv", "quantized", "snapkv"]).kv_methods == ("snapkv", "quantized")  # once each
    narrow = kv.only(["snapkv", "snapkv:unit=word"]).at(ratios=["0.2"], settings=["aware"])
    assert [c.label for c in narrow.configs()] == ["full", "kv:snapkv@0.2:aware", "kv:snapkv:unit=word@0.2:aware"]
    for ratios, settings, match in ((["0"], None, "kept fraction in"), (["half"], None, "kept fraction in"),
                                    (None, ["sideways"], "unknown KV setting sideways")):
        with pytest.raises(InputError, match=match):
            kv.at(ratios=ratios, settings=settings)


def test_generated_tasks_hold_their_facts(data_dir, tokenizer):
    multi = MultiKeyNeedle(lengths=(300,), needles=3).examples(data_dir, 3, seed=0, tokenizer=tokenizer)
    for example in multi:
        key = example.question.split(" for ")[1].split(" mentioned")[0]
        assert f"The special magic number for {key} is {example.answers[0]}." in example.context
        assert example.context.count("The special magic number for") == 3
        assert example.survives(example.context) == 1.0
    chain = VariableTracking(lengths=(300,), hops=2).examples(data_dir, 2, seed=0, tokenizer=tokenizer)
    for example in chain:
        names = example.answers
        value = example.question.split("value ")[1].split(",")[0]
        text = example.context
        assert text.index(f"VAR {names[0]} = {value}.") < text.index(f"VAR {names[1]} = VAR {names[0]}.") \
            < text.index(f"VAR {names[2]} = VAR {names[1]}.")
        assert VariableTracking.score(" ".join(names[:2]), example) == pytest.approx(2 / 3)
    words = CommonWords(frequent=2, frequent_count=5, rare=4, rare_count=2).examples(data_dir, 1, seed=0)[0]
    items = [line.split(". ", 1)[1] for line in words.context.splitlines()]
    assert len(items) == 2 * 5 + 4 * 2 and all(items.count(w) == 5 for w in words.answers)
    assert CommonWords.score(" and ".join(words.answers).upper(), words) == 1.0
    assert set(TASKS) >= {"niah-multikey", "variable-tracking", "common-words"}
