"""NQ with lexical distractors (BM25 against the question), and the rag profile that reports both variants."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from ctxpress.bench.catalog import TASKS
from ctxpress.bench.data import REQUIRED, find_data_dir, load_nq
from ctxpress.bench.metrics import normalize_answer
from ctxpress.bench.profiles import RAG_BASELINES, RAG_METHODS, profile
from ctxpress.bench.tasks import BM25, NQ, lexical_words
from ctxpress.errors import InputError

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_real_data = pytest.mark.skipif(not (REAL_DATA / "nq-open-oracle.dev.jsonl.gz").is_file(),
                                     reason="no ../shared/data")

# Six topics of four questions each: a question's lexical neighbours are the other three of its topic.
TOPICS = [
    ["volcano", "lava", "eruption", "magma", "crater", "ash"],
    ["violin", "orchestra", "symphony", "concerto", "conductor", "tempo"],
    ["glacier", "iceberg", "arctic", "tundra", "permafrost", "fjord"],
    ["satellite", "orbit", "rocket", "launch", "telescope", "comet"],
    ["cathedral", "bishop", "chapel", "abbey", "monastery", "altar"],
    ["tennis", "racket", "tournament", "serve", "wimbledon", "umpire"],
]
FILLER = ["river", "stone", "light", "garden", "paper", "window", "silver", "morning", "quiet",
          "number", "letter", "music", "harbor", "forest", "engine", "market", "winter", "travel"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """An NQ file in the format of ../shared/data: 24 records, record i on topic i % 6."""
    root = tmp_path_factory.mktemp("nq")
    records = []
    for i in range(24):
        topic, member = TOPICS[i % 6], i // 6
        words = [*topic, *(FILLER[(i + k) % len(FILLER)] for k in range(20))]
        text = f"{' '.join(words)}. The answer to item {i} is Agent{i:02d}."
        if i == 6:  # on record 0's topic, and holding record 0's answer
            text += " Agent00 was here too."
        question = f"which {topic[member]} of the {topic[member + 1]} and {topic[member + 2]} is item {i}"
        records.append({"question": question, "answers": [f"Agent{i:02d}"],
                        "ctxs": [{"title": f"Title {i}", "text": text, "hasanswer": True, "isgold": True}]})
    with gzip.open(root / "nq-open-oracle.dev.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    return root


def lexical(**settings) -> NQ:
    return NQ(distractors="lexical", name="nq-lexical", **settings)


def digest(examples) -> str:
    blob = json.dumps([[e.task, e.id, e.documents, e.question, e.answers, e.meta] for e in examples])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def distractors(example) -> list[str]:
    return [d for k, d in enumerate(example.documents) if k != example.meta["gold_position"]]


def shared_words(example) -> float:
    """Distinct question words a distractor shares with the question, on average over the distractors."""
    question = set(lexical_words(example.question.removeprefix("Question: ").removesuffix("\nAnswer:")))
    counts = [len(question & set(lexical_words(d))) for d in distractors(example)]
    return sum(counts) / len(counts)


def test_random_distractors_are_unchanged(data_dir):
    # Computed with the NQ task as it was before the lexical variant existed: `nq` rows stay comparable.
    expected = {(10, 0, "dev"): "03c7b553fd2883f5", (10, 7, "report"): "faab3547dfc944ec",
                (4, 0, "report"): "a268ff49ef24e047", (4, 7, "dev"): "8619ddcc00907e3b"}
    for (documents, seed, split), value in expected.items():
        task = NQ() if documents == 10 else NQ(documents=4, gold_positions=(0, 3))
        assert digest(task.examples(data_dir, 12, seed, split=split)) == value


def test_lexical_distractors_are_the_questions_topic_without_its_answer(data_dir):
    task = lexical(documents=4, gold_positions=(0, 3))
    examples = task.examples(data_dir, 12, seed=0, split="dev") + task.examples(data_dir, 12, seed=0, split="report")
    assert len(examples) == 24
    for example in examples:
        i = int(example.id.removeprefix("nq-"))
        position = (0, 3)[i % 2]
        assert example.task == "nq-lexical" and example.meta == {"documents": 4, "gold_position": position}
        assert example.documents[position].startswith(f"Document [{position + 1}](Title: Title {i})")
        others = distractors(example)
        assert len(others) == 3 and len(set(others)) == 3
        assert not any(normalize_answer(example.answers[0]) in normalize_answer(d) for d in others)
        titles = {int(d.split("(Title: Title ")[1].split(")")[0]) for d in others}
        same_topic = {j for j in range(24) if j % 6 == i % 6 and j != i} - ({6} if i == 0 else set())
        assert same_topic <= titles  # every same-topic passage that may be a distractor is one
    first = examples[0]
    assert "Title 6)" not in first.context  # on topic, but it holds Agent00: never a distractor
    assert "Title 6)" not in NQ(documents=4).examples(data_dir, 1, seed=0, split="dev")[0].context


def test_lexical_distractors_share_more_question_words_than_random_ones(data_dir):
    for split in ("dev", "report"):
        near = lexical(documents=5).examples(data_dir, 12, seed=0, split=split)
        far = NQ(documents=5).examples(data_dir, 12, seed=0, split=split)
        assert [e.question for e in near] == [e.question for e in far]
        mean_near = sum(map(shared_words, near)) / len(near)
        mean_far = sum(map(shared_words, far)) / len(far)
        assert mean_near > mean_far + 1


def test_lexical_examples_are_deterministic(data_dir):
    task = lexical(documents=6, gold_positions=(1, 5))
    once = task.examples(data_dir, 12, seed=0, split="report")
    assert digest(once) == digest(task.examples(data_dir, 12, seed=0, split="report"))
    assert digest(once) == digest(task.examples(data_dir, 12, seed=3, split="report"))  # no randomness at all
    with pytest.raises(ValueError, match="unknown distractors 'nearest'"):
        NQ(distractors="nearest")


def test_bm25_ranks_rare_and_concentrated_words_first():
    index = BM25.index([
        "the river and the stone",  # 0: a common word only
        "river delta",  # 1: the common word and a rare one, short
        "river delta " + "filler " * 4,  # 2: the same words in a longer text
        "nothing in common",  # 3
        "what is the",  # 4: stopwords only
        "stone river",  # 5: the common word again
    ])
    scores = index.scores("What is the river delta?")
    assert set(scores) == {0, 1, 2, 5}  # stopwords match nothing
    assert scores[1] > scores[2] > scores[5] == scores[0] > 0
    assert index.ranking("What is the river delta?") == [1, 2, 0, 5, 3, 4]  # ties and misses in index order
    assert lexical_words("Who WROTE Hamlet's play?") == ["wrote", "hamlet", "s", "play"]


def test_the_variant_is_a_task_of_its_own():
    task = TASKS["nq-lexical"]()
    assert isinstance(task, NQ) and (task.name, task.distractors) == ("nq-lexical", "lexical")
    assert TASKS["nq"]().distractors == "random"
    assert REQUIRED["nq-lexical"] == REQUIRED["nq"]


def test_data_dir_for_both_variants(data_dir, tmp_path):
    assert find_data_dir(data_dir, ["nq", "nq-lexical"]) == data_dir
    with pytest.raises(InputError, match=r"no evaluation data \(nq-open-oracle.dev.jsonl.gz\) in"):
        find_data_dir(tmp_path, ["nq", "nq-lexical"])  # the file is named once


def test_rag_profile():
    grid = profile("rag")
    assert set(grid.tasks) == {"nq", "nq-lexical"}
    for name, (task, count) in grid.tasks.items():
        assert (task.name, task.documents, task.gold_positions, count) == (name, 5, (0, 2, 4), 100)
    assert grid.tasks["nq-lexical"][0].distractors == "lexical" and grid.tasks["nq"][0].distractors == "random"
    methods = ["dac-words", "dac-words:attention_from=question", "llmlingua", "entropy"]
    assert list(RAG_BASELINES) == methods and grid.kv_methods == ()
    every = (*RAG_METHODS, *methods)  # the question-aware methods first, then the baselines
    assert [c.label for c in grid.configs()] == ["full"] + [f"{m}@{r:g}" for r in (0.5, 0.33, 0.2) for m in every]
    assert {c.family for c in grid.configs()} == {"reference", "prompt"}
    narrow = grid.only(["dac-words:attention_from=question"])
    assert [c.label for c in narrow.configs()] == [
        "full", *(f"dac-words:attention_from=question@{r:g}" for r in (0.5, 0.33, 0.2))]


@needs_real_data
def test_real_dev_split():
    # `nq` as it was before the lexical variant existed (the same computation as above, on the real file)
    five = NQ(documents=5, gold_positions=(0, 2, 4))
    assert digest(five.examples(REAL_DATA, 10, 0, split="dev")) == "9aa4e150ade4971f"
    assert digest(five.examples(REAL_DATA, 10, 7, split="report")) == "7996c7111ea155a3"
    near = lexical(documents=5, gold_positions=(0, 2, 4)).examples(REAL_DATA, 100, 0, split="dev")
    far = five.examples(REAL_DATA, 100, 0, split="dev")
    texts = [r["ctxs"][0]["text"] for r in load_nq(REAL_DATA)]

    def text_of(document: str) -> str:
        return max((t for t in texts if document.endswith(f") {t}")), key=len)

    for example in near:
        gold = text_of(example.documents[example.meta["gold_position"]])
        answers = [normalize_answer(a) for a in example.answers]
        assert len(example.documents) == 5
        others = [text_of(d) for d in distractors(example)]
        assert len({gold, *others}) == 5  # no text twice (the data repeats a few passages)
        for passage in others:
            assert not any(a and a in normalize_answer(passage) for a in answers)
    assert sum(map(shared_words, near)) / 100 > sum(map(shared_words, far)) / 100 + 1
