"""Run a profile's grid over its tasks, one JSON line per (example, configuration).

For every example and prompt configuration the (possibly compressed) prompt
is built once; every KV configuration then compresses the cache of its
context part (with the question, for question-aware configurations),
answers greedily, and scores the gold answer under teacher forcing. The
configurations of one setting share one prefill (each press still gets the
cache a prefill of its own would give it: :mod:`ctxpress.kv.fanout`), so
``prefill_seconds`` is that shared pass's. Lines are appended and flushed
as they are produced: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from ..chat import prompt_ids
from ..errors import InputError
from ..jsonl import complete_lines, read_records
from ..kv import FULL, build_press, press_with_budget
from ..kv.fanout import prefill_needs
from ..kv.generation import CompressedContext
from ..memory import PeakMemory
from ..models import LoadedModel
from ..options import parse_spec
from ..progress import progress_bar
from ..prompt import PromptCompressor
from .metrics import mean_kl, mean_nll
from .profiles import Config, Profile
from .tasks import SPLITS, Example

RESULTS = "examples.jsonl"
LOCK = ".lock"  # held while a run writes the folder
MANIFEST = "run.json"  # what produced the results, so a resume never mixes two different runs


def row_key(task: str, example: str, label: str) -> str:
    return f"{task}/{example}/{label}"


class Runner:
    def __init__(self, lm: LoadedModel, profile: Profile, data: Path, out: Path, *, seed: int = 0,
                 split: str = "report", tasks: list[str] | None = None, examples: int | None = None,
                 progress: bool | None = None) -> None:
        if split not in SPLITS:
            raise InputError(f"unknown split '{split}' (choose from: {', '.join(SPLITS)})")
        self.lm, self.profile, self.data, self.out = lm, profile, data, out
        self.seed, self.split, self.progress = seed, split, progress
        self.tasks = {name: spec for name, spec in profile.tasks.items() if tasks is None or name in tasks}
        self.limit = examples
        self.compressor = PromptCompressor(lm, progress=False)

    def examples(self) -> Iterator[tuple[object, Example]]:
        for task, count in self.tasks.values():
            n = count if self.limit is None else min(count, self.limit)
            for example in task.examples(self.data, n, self.seed, self.lm.tokenizer, self.split):
                yield task, example

    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        with _only_writer(self.out):
            return self._run()

    def _run(self) -> Path:
        path = self.out / RESULTS
        self._check_manifest(path)
        complete_lines(path)  # drop a line cut by an interruption before appending
        done = {row["key"] for row in read_records(path)}
        work = list(self.examples())
        configs = self.profile.configs()
        todo = sum(row_key(e.task, e.id, c.label) not in done for _, e in work for c in configs)
        with path.open("a", encoding="utf-8") as sink, progress_bar(todo, self.progress, "bench", "run") as bar:
            for task, example in work:
                for row in self._evaluate(task, example, configs, done):
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sink.flush()
                    bar.update(1)
        return path

    def _check_manifest(self, results: Path) -> None:
        manifest = {"profile": self.profile.name, "seed": self.seed, "split": self.split, "model": self.lm.name}
        path = self.out / MANIFEST
        if results.exists() and path.exists():
            earlier = json.loads(path.read_text())
            if earlier != manifest:
                raise InputError(f"{self.out} holds results of another run ({earlier}, now {manifest}); "
                                 "pass --fresh to discard them or choose another --out")
        path.write_text(json.dumps(manifest) + "\n")

    def _evaluate(self, task, example: Example, configs: list[Config], done: set[str]) -> Iterator[dict]:
        groups: dict[tuple, list[Config]] = {}
        for config in configs:
            if row_key(example.task, example.id, config.label) not in done:
                groups.setdefault((config.prompt_method, config.prompt_rate), []).append(config)
        tok = self.lm.tokenizer
        answer_ids = torch.tensor([tok(example.answers[0], add_special_tokens=False)["input_ids"]])
        for (method, rate), group in groups.items():
            prompt = self._prompt(example, method, rate)
            context_ids, question_ids = prompt_ids(tok, example.instruction + "\n\n" + prompt["context"],
                                                   example.question)
            reference = None
            whole = torch.cat([context_ids, question_ids, answer_ids], dim=1)
            contexts = _SharedPrefills(self.lm, group)
            for config in group:
                # Question-aware: the question is prefilled (and seen by the press) but its last token,
                # which generation feeds. The answer rows are the same in both settings.
                cut = context_ids.shape[1] + (question_ids.shape[1] - 1 if config.question_aware else 0)
                prefix, asked = whole[:, :cut], whole[:, cut : context_ids.shape[1] + question_ids.shape[1]]
                forced, answer_rows = whole[:, cut:], slice(asked.shape[1], None)
                with self.lm.lock, PeakMemory(self.lm.device) as peak:
                    ctx = contexts.take(config, prefix)
                    new, speed = ctx.generate(asked, self.profile.max_new_tokens or task.max_new_tokens)
                    logits = ctx.next_token_logits(forced)[answer_rows]
                if config.kv_method == FULL:
                    reference = logits
                elif reference is None:  # the full row was written by an earlier, interrupted run
                    with self.lm.lock:
                        full = CompressedContext(self.lm, context_ids, build_press(FULL))
                        reference = full.next_token_logits(whole[:, context_ids.shape[1]:])[
                            question_ids.shape[1]:]
                answer = tok.decode(new, skip_special_tokens=True).strip()
                yield {
                    "key": row_key(example.task, example.id, config.label),
                    "task": example.task, "example": example.id, "meta": example.meta,
                    "config": config.label, "family": config.family, **asdict(config),
                    "answer": answer, "gold": example.answers,
                    "score": task.score(answer, example),
                    "survival": example.survives(prompt["context"]),
                    "nll": mean_nll(logits, answer_ids[0]),
                    "kl": None if config.kv_method == FULL else mean_kl(reference, logits),
                    **prompt["stats"],
                    "prompt_tokens": int(context_ids.shape[1] + question_ids.shape[1]),
                    "cache_bytes": ctx.cache_bytes, "full_cache_bytes": ctx.full_cache_bytes,
                    "byte_rate": ctx.cache_bytes / ctx.full_cache_bytes,
                    "kv_compress_seconds": ctx.compress_seconds, "prefill_seconds": ctx.prefill_seconds,
                    "decode_tokens_per_second": speed, "peak_memory_bytes": peak.bytes,
                }

    def _prompt(self, example: Example, method: str | None, rate: float | None) -> dict:
        """The context as the target model will read it, and what compressing it cost."""
        if method is None:
            n = self.compressor.count_tokens(example.context)
            return {"context": example.context,
                    "stats": {"context_tokens": n, "kept_tokens": n, "token_rate": 1.0, "prompt_seconds": 0.0}}
        start = time.perf_counter()
        name, options = parse_spec(method)
        result = self.compressor.compress(example.documents, rate=rate, method=name, **options,
                                          instruction=example.instruction, question=example.question)
        return {"context": result.compressed_text,
                "stats": {"context_tokens": result.origin_tokens, "kept_tokens": result.compressed_tokens,
                          "token_rate": result.rate, "prompt_seconds": time.perf_counter() - start}}


def _press(config: Config):
    """The press of a configuration's KV method (``full``: one that keeps everything)."""
    name, options = parse_spec(config.kv_method)
    return press_with_budget(name, config.kv_ratio, options=options)


class _SharedPrefills:
    """The compressed contexts of one example's configurations: configurations with the same prefix
    whose presses need the same from a prefill share one (:meth:`CompressedContext.sharing_prefill`), so
    a prompt is prefilled once per setting, not once per method. Each context is compressed when its
    configuration's turn comes (configurations are taken in the order given), so memory holds the
    dense prefill and one compressed cache, not all of them."""

    def __init__(self, lm: LoadedModel, configs: list[Config]) -> None:
        self.lm, self.configs = lm, configs
        self.presses = {config.label: _press(config) for config in configs}
        self.stream_of: dict[str, Iterator[CompressedContext]] = {}  # label -> its group's contexts

    def take(self, config: Config, prefix: torch.Tensor) -> CompressedContext:
        if config.label not in self.stream_of:
            needs = prefill_needs(self.presses[config.label])
            together = [c for c in self.configs if c.label not in self.stream_of
                        and c.question_aware == config.question_aware and prefill_needs(self.presses[c.label]) == needs]
            stream = CompressedContext.sharing_prefill(self.lm, prefix, [self.presses[c.label] for c in together])
            self.stream_of.update({c.label: stream for c in together})
        context = next(self.stream_of[config.label])
        if context.press is not self.presses[config.label]:  # the group's contexts come in its order
            raise ValueError(f"configurations are taken in the order given; {config.label} is out of turn")
        return context


@contextmanager
def _only_writer(out: Path) -> Iterator[None]:
    """Hold ``out`` for this run: two runs appending to one results file would interleave their rows.
    The lock is the operating system's (``flock``), so a killed run never leaves it behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with (out / LOCK).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another ctxpress bench is writing to {out}; "
                             "wait for it or choose another --out") from None
        yield


__all__ = ["RESULTS", "Runner"]
