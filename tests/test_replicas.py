"""`ctxpress serve --replicas 2`: two model replicas on Ray Serve behind one port, driven over real HTTP."""

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ctxpress.cli import EXIT_INTERRUPTED, main

from conftest import TEXT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``ctxpress serve --replicas 2`` in a subprocess, its stderr collected by a thread (so the pipe never fills)."""

    def __init__(self, tiny_model_dir: str, *extra: str) -> None:
        port = free_port()
        cmd = [sys.executable, "-m", "ctxpress.cli", "serve", "--model", tiny_model_dir, "--port", str(port),
               "--replicas", "2", "--threads", "1", *extra]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stderr:  # one line at a time, so a waiting test sees each as it comes
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)[-2000:]

    def wait_until_serving(self, seconds: float = 240) -> None:
        """Until serve says every replica is up. Not the first 200 from /healthz: Serve's proxy answers as
        soon as one replica runs, while the other may still be loading its model."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if any("ctxpress: serving on" in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the reader thread take the last lines
                pytest.fail(f"serve exited {self.proc.returncode}: {self.stderr}")
            time.sleep(0.5)
        pytest.fail(f"two replicas did not start in time: {self.stderr}")


def test_two_replicas_answer_behind_one_port_and_stop_cleanly(tiny_model_dir):
    pytest.importorskip("ray.serve")
    httpx = pytest.importorskip("httpx")
    server = Server(tiny_model_dir)
    proc, base = server.proc, server.base
    try:
        server.wait_until_serving()

        def chat(i: int) -> httpx.Response:
            return httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
                "model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": f"{TEXT} {i}"}],
                "kv_compression": {"method": "snapkv-words", "ratio": 0.5}})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(chat, range(16)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        assert all(r.json()["choices"][0]["message"]["role"] == "assistant" for r in answers)
        # the same endpoint reaches both replicas: two model processes
        pids = {httpx.get(f"{base}/healthz", timeout=10).json()["pid"] for _ in range(40)}
        assert len(pids) == 2
        # a user error is still a 4xx with a JSON body through Serve
        bad = httpx.post(f"{base}/v1/compress", json={"context": TEXT, "rate": 0.5, "method": "nope"}, timeout=60)
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == EXIT_INTERRUPTED, server.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_replica_options_without_replicas_are_refused(capsys):
    assert main(["serve", "--threads", "2"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_a_busy_port_is_a_one_line_error_before_ray_starts(capsys, tiny_model_dir):
    pytest.importorskip("ray.serve")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["serve", "--replicas", "2", "--port", str(port), "--model", tiny_model_dir])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot serve on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,needle", [(["--max-queue", "0"], "--max-queue 0"),
                                          (["--threads", "512"], "this Ray cluster has")])
def test_replica_settings_ray_cannot_honour_are_one_line_errors(tiny_model_dir, extra, needle):
    pytest.importorskip("ray.serve")
    cmd = [sys.executable, "-m", "ctxpress.cli", "serve", "--replicas", "2", "--port", str(free_port()),
           "--model", tiny_model_dir, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    last = done.stderr.strip().splitlines()[-1]  # Ray may log its start first
    assert done.returncode == 2 and last.startswith("ctxpress: error: ") and needle in last, done.stderr
    assert "Traceback" not in done.stderr
