"""``ctxpress batch``: compress one field of every line of a JSONL corpus.

Output has one line per input line, in order: the input's line number (and
``id`` if it has one) with the compression result, or with ``error`` when
that line could not be compressed (invalid JSON, missing field, empty text,
budget too large...). A run appends to its output and, started again, skips
the lines already written, so an interrupted job resumes. Lines are
processed by ``--workers`` local processes or, with ``--engine ray``, by as
many Ray actors, each loading the model once (a local Ray by default,
``--ray-address`` for a cluster); both give the same output. Wall-clock
``seconds`` are left out of the lines, so the output depends only on the
input and the settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from .errors import CtxpressError, InputError
from .jsonl import complete_lines
from .progress import progress_bar
from .prompt.methods import DEFAULT_METHOD
from .request import PromptRequest

CHUNK_LINES = 2048  # lines queued for the Ray actors at a time


@dataclass(frozen=True)
class BatchJob:
    """Where the lines come from and go, what to compress and how, and who does the work.

    The compression settings are kept as plain fields (not a nested
    :class:`~ctxpress.request.PromptRequest`) so that the job travels to Ray
    actors as a flat dict; :meth:`request` checks them.
    """

    source: str
    target: str
    field: str
    rate: float | None = None
    target_tokens: int | None = None
    method: str = DEFAULT_METHOD
    options: dict = field(default_factory=dict)
    model: str = "smollm2-135m"
    device: str | None = None
    dtype: str | None = None
    workers: int = 1
    engine: str = "local"
    ray_address: str | None = None

    def request(self) -> PromptRequest:
        """The compression asked for, checked (one error for the job rather than one per line)."""
        return PromptRequest(rate=self.rate, target_tokens=self.target_tokens, method=self.method,
                             options=self.options, where="")

    @property
    def threads(self) -> int:
        """Torch threads per worker; fixed so every engine computes the same numbers."""
        return max(1, (os.cpu_count() or 1) // self.workers)


def field_value(record: object, path: str):
    """``record["a"]["b"]`` for ``path="a.b"``; a string or a list of strings."""
    value = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise InputError(f"no field '{path}'")
        value = value[part]
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise InputError(f"field '{path}' is not text (a string or a list of strings)")
    return value


class LineCompressor:
    """Turns one input line into one output line (a worker holds one of these)."""

    def __init__(self, job: BatchJob) -> None:
        import torch

        from .models import load_model
        from .prompt import PromptCompressor

        torch.set_num_threads(job.threads)
        self.job, self.request = job, job.request()
        self.compressor = PromptCompressor(load_model(job.model, device=job.device, dtype=job.dtype),
                                           progress=False)

    def __call__(self, number: int, raw: str) -> str:
        job = self.job
        out: dict = {"line": number}
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and "id" in record:
                out["id"] = record["id"]
            result = self.request.compress(self.compressor, field_value(record, job.field))
            out.update({k: v for k, v in result.to_dict().items() if k != "seconds"})
        except json.JSONDecodeError as exc:
            out["error"] = f"invalid JSON: {exc.msg} (column {exc.colno})"
        except CtxpressError as exc:
            out["error"] = str(exc)
        return json.dumps(out, ensure_ascii=False)


def _lines(source: Path, skip: int) -> Iterator[tuple[int, str]]:
    with source.open(encoding="utf-8", errors="replace") as fh:
        for number, line in islice(enumerate(fh), skip, None):
            yield number, line.rstrip("\n")


_WORKER: LineCompressor | None = None


def _init_worker(job: BatchJob) -> None:
    global _WORKER
    _WORKER = LineCompressor(job)


def _work(item: tuple[int, str]) -> str:
    return _WORKER(*item)


def run(job: BatchJob, progress: bool | None = None) -> int:
    """Process the lines not yet in ``job.target``; return how many were written now."""
    source, target = Path(job.source), Path(job.target)
    if not source.is_file():
        raise InputError(f"cannot read {source}: no such file")
    if job.engine not in ("local", "ray"):
        raise InputError(f"unknown engine '{job.engine}' (local or ray)")
    if job.workers < 1:
        raise InputError("workers must be at least 1")
    job.request()  # checked before any worker loads a model
    with source.open("rb") as fh:
        total = sum(1 for _ in fh)
    done = complete_lines(target)
    pending = _lines(source, done)
    written = 0
    with target.open("a", encoding="utf-8") as sink, progress_bar(total - done, progress, "batch", "line") as bar:
        for line in _results(job, pending, progress):
            sink.write(line + "\n")
            sink.flush()
            written += 1
            bar.update(1)
    return written


def _results(job: BatchJob, pending: Iterator[tuple[int, str]], progress: bool | None) -> Iterator[str]:
    if job.engine == "ray":
        yield from _ray_results(job, pending, progress)
    elif job.workers == 1:
        worker = LineCompressor(job)
        for number, raw in pending:
            yield worker(number, raw)
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(job.workers, _init_worker, (job,)) as pool:
            yield from pool.imap(_work, pending, chunksize=1)


class _RayLineWorker:
    """A Ray actor holding one :class:`LineCompressor` (one model load per actor)."""

    def __init__(self, spec: dict) -> None:
        self.compress = LineCompressor(BatchJob(**spec))

    def ready(self) -> bool:
        """Answered once the model is loaded: the driver shows start-up progress with it."""
        return True

    def run(self, number: int, raw: str) -> str:
        return self.compress(number, raw)


def _started(actors: list, progress: bool | None) -> None:
    """Wait until every actor has loaded its model, with a bar: on a busy machine this can take minutes,
    and a worker that cannot load fails here."""
    import ray

    waiting = [actor.ready.remote() for actor in actors]
    with progress_bar(len(waiting), progress, "starting Ray workers (model load)", "worker") as bar:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(done)
            except ray.exceptions.RayError as exc:
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                raise CtxpressError(f"a Ray worker could not start: {first}") from None
            bar.update(len(done))


def _init_ray(address: str | None) -> None:
    """Connect to ``address``, or start a Ray instance on this machine whose workers run at the driver's
    priority, as ``--engine local`` workers do: Ray's default (niceness 15) lets any other busy process
    on the machine starve them, so a batch that takes a minute alone took over ten beside one."""
    import ray

    local = address is None and not os.environ.get("RAY_ADDRESS")
    extra = {"_system_config": {"worker_niceness": 0}} if local else {}
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **extra)


def _ray_results(job: BatchJob, pending: Iterator[tuple[int, str]], progress: bool | None) -> Iterator[str]:
    """Lines through ``job.workers`` Ray actors, started once and fed in order, chunk by chunk."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise CtxpressError("--engine ray needs Ray: pip install ray") from exc
    _init_ray(job.ray_address)
    worker = ray.remote(num_cpus=job.threads)(_RayLineWorker)
    actors = [worker.remote(asdict(job)) for _ in range(job.workers)]
    pool = ActorPool(actors)
    try:
        _started(actors, progress)
        while chunk := list(islice(pending, CHUNK_LINES)):  # bounded memory: one chunk in flight
            yield from pool.map(lambda actor, item: actor.run.remote(*item), chunk)
    finally:
        for actor in actors:
            ray.kill(actor)
