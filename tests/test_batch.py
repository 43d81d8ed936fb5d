"""ctxpress batch: one output line per input line, bad lines reported, resumable, engines agree."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ctxpress.batch import BatchJob, run
from ctxpress.cli import main
from ctxpress.jsonl import complete_lines

from conftest import TEXT

LINES = [
    json.dumps({"id": "a", "text": TEXT}),
    "{broken json",
    json.dumps({"id": "c", "body": "no text field here"}),
    json.dumps({"id": "d", "text": "   "}),
    json.dumps({"id": "e", "text": ["First document about foxes.", "Second document: 12 and 345."]}),
    json.dumps({"id": "f", "text": TEXT[:120]}),
    json.dumps({"id": "g", "text": 42}),
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    return path


def job(corpus, target, model, **kw):
    return BatchJob(str(corpus), str(target), "text", rate=0.5, model=model, **kw)


def test_one_line_per_input_and_errors(tmp_path, corpus, tiny_model_dir):
    target = tmp_path / "out.jsonl"
    assert run(job(corpus, target, tiny_model_dir), progress=False) == len(LINES)
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [o["line"] for o in out] == list(range(len(LINES)))
    good = {o["id"]: o for o in out if "error" not in o}
    assert set(good) == {"a", "e", "f"}
    assert abs(good["a"]["compressed_tokens"] - round(0.5 * good["a"]["origin_tokens"])) <= 1
    errors = {o["line"]: o["error"] for o in out if "error" in o}
    assert "invalid JSON" in errors[1] and "no field 'text'" in errors[2]
    assert "empty" in errors[3] and "not text" in errors[6]
    assert all("seconds" not in o for o in out)


def test_resume_after_interruption(tmp_path, corpus, tiny_model_dir):
    full = tmp_path / "full.jsonl"
    run(job(corpus, full, tiny_model_dir), progress=False)
    lines = full.read_text().splitlines()
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed while writing line 4
    assert complete_lines(partial) == 3
    assert run(job(corpus, partial, tiny_model_dir), progress=False) == len(LINES) - 3
    assert partial.read_text() == full.read_text()
    assert run(job(corpus, partial, tiny_model_dir), progress=False) == 0  # nothing left to do


def test_local_workers_and_ray_give_identical_output(tmp_path, corpus, tiny_model_dir):
    pytest.importorskip("ray")
    local = tmp_path / "local.jsonl"
    ray_out = tmp_path / "ray.jsonl"
    run(job(corpus, local, tiny_model_dir, workers=2), progress=False)
    run(job(corpus, ray_out, tiny_model_dir, workers=2, engine="ray"), progress=False)
    assert local.read_text() == ray_out.read_text()
    assert len(local.read_text().splitlines()) == len(LINES)


def test_cli_batch(tmp_path, corpus, tiny_model_dir, capsys):
    target = tmp_path / "cli.jsonl"
    code = main(["batch", str(corpus), str(target), "--field", "text", "--target-tokens", "5", "--method", "random",
                 "--model", tiny_model_dir, "--no-progress"])
    assert code == 0 and f"{len(LINES)} lines written" in capsys.readouterr().err
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert [o.get("compressed_tokens") for o in out if o.get("id") in ("a", "e", "f")] == [5, 5, 5]
    code = main(["batch", str(tmp_path / "missing.jsonl"), str(target), "--field", "text", "--rate", "0.5",
                 "--model", tiny_model_dir])
    assert code == 2 and "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sigkill_mid_run_then_resume_writes_every_line_exactly_once(tmp_path, tiny_model_dir, engine):
    """A real SIGKILL of ``ctxpress batch``, a torn last line, a second run: nothing lost or doubled."""
    if engine == "ray":
        pytest.importorskip("ray")
    lines = 600
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"id": f"n{i}", "text": TEXT}) + "\n" for i in range(lines)))
    cmd = [sys.executable, "-m", "ctxpress.cli", "batch", str(source), str(target), "--field", "text",
           "--rate", "0.5", "--method", "entropy", "--model", tiny_model_dir, "--no-progress", "--engine", engine]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if target.exists() and target.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    before = target.read_bytes().count(b"\n")
    assert 20 <= before < lines  # killed in the middle of the run
    with target.open("a", encoding="utf-8") as fh:  # as if the kill had cut a line in half
        fh.write(f'{{"line": {before}, "id": "n{before}", "compressed_te')
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [o["line"] for o in out] == list(range(lines))
    assert [o["id"] for o in out] == [f"n{i}" for i in range(lines)]
    assert all("error" not in o and o["compressed_tokens"] > 0 for o in out)


def test_a_ray_instance_started_here_runs_workers_at_the_drivers_priority(monkeypatch):
    """Ray's default niceness of 15 let any busy process starve the workers: ten times slower beside a bench."""
    ray = pytest.importorskip("ray")
    from ctxpress.batch import _init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a cluster named there keeps its own setting
    ray.shutdown()  # a fresh instance, not one an earlier test started
    _init_ray(None)
    try:
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
    finally:
        ray.shutdown()
