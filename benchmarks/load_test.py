"""Load test of ``ctxpress serve`` on loopback: concurrent clients, mixed good and bad requests.

Starts a real server process (``ctxpress serve``), then runs ``--clients``
concurrent clients for ``--seconds``. Each client sends, in turn, a valid
``/v1/compress`` request, a valid short chat completion, malformed JSON, and
a request with an unknown method option (the last two must be 4xx, never
500). Reports throughput, p50/p99 latency of the answered requests, counts
by status (429 when more than ``--max-queue`` wait), and the server's
resident memory (its whole process tree) before (after one warm-up request per endpoint), at its
peak during, and 5 s after the load; checks that
the server still answers ``/healthz`` afterwards. ``--rounds N`` repeats the
load N times against the same server, one row per round: memory that settles
after the first rounds is retained, memory that climbs round after round grows
with the number of requests.

With ``--replicas N`` the server runs N model replicas on Ray Serve; compare
the throughput of ``--replicas 1`` and ``--replicas 2`` on the same machine.

Usage: python benchmarks/load_test.py [--clients 16] [--seconds 60] [--max-queue 8] [--replicas 1]
       [--rounds 1] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table

CONTEXT = ("Prompt compression removes the tokens of a prompt that carry the least information. "
           "A small language model reads the prompt once and scores every word. ") * 6


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # gone meanwhile
        pass
    return 0


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (with --replicas: Ray and every replica)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[parent].append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss_of(pid)
        todo.extend(children.get(pid, []))
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def requests() -> list[tuple[str, dict | bytes]]:
    return [
        ("/v1/compress", {"context": CONTEXT, "rate": 0.5}),
        ("/v1/chat/completions", {"model": "m", "max_tokens": 8,
                                  "messages": [{"role": "user", "content": "Name a colour."}]}),
        ("/v1/compress", b'{"context": "unterminated'),
        ("/v1/compress", {"context": CONTEXT, "rate": 0.5, "options": {"bogus": 1}}),
    ]


async def client(base: str, until: float, log: list, offset: int) -> None:
    import httpx

    mix = requests()
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        i = offset
        while time.time() < until:
            path, body = mix[i % len(mix)]
            i += 1
            start = time.perf_counter()
            try:
                if isinstance(body, bytes):
                    r = await http.post(path, content=body, headers={"content-type": "application/json"})
                else:
                    r = await http.post(path, json=body)
                status = r.status_code
                if status in (429, 503):  # 503: Ray Serve's back-pressure with --replicas
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            log.append((status, time.perf_counter() - start, path))


def run_round(base: str, args: argparse.Namespace, pid: int, baseline: int) -> tuple[float, list, int, int, bool]:
    """One load round against a running server: (seconds, request log, peak RSS, RSS 5 s after,
    whether it still answers ``/healthz``)."""
    import httpx

    peak, sampling = [baseline], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], tree_rss(pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log: list = []
    start = time.time()

    async def run_all() -> None:
        until = start + args.seconds
        await asyncio.gather(*(client(base, until, log, k) for k in range(args.clients)))

    asyncio.run(run_all())
    elapsed = time.time() - start
    sampling.set()
    sampler.join()
    time.sleep(5)  # the server trims its heap once the last request has left
    after = tree_rss(pid)
    return elapsed, log, peak[0], after, httpx.get(f"{base}/healthz", timeout=10).status_code == 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (ctxpress serve --replicas)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="load rounds against the same server, one row each: memory after each round "
                             "tells retained memory that settles from growth with the number of requests")
    args = parser.parse_args()
    if args.rounds < 1 or args.clients < 1 or args.seconds <= 0:
        parser.error("--rounds and --clients must be at least 1 and --seconds positive")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ctxpress.cli", "serve", "--port", str(port),
                               "--model", args.model, "--max-queue", str(args.max_queue),
                               *(["--replicas", str(args.replicas)] if args.replicas > 1 else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    import httpx

    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                sys.exit(f"server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("server did not start in 5 minutes")
            time.sleep(0.5)
        for path, body in requests()[:2]:  # warm-up: both endpoints once, so the baseline holds what they load
            httpx.post(f"{base}{path}", json=body, timeout=120)
        baseline = tree_rss(server.pid)
        rounds = [run_round(base, args, server.pid, baseline) for _ in range(args.rounds)]
    finally:
        server.terminate()
        server.wait(timeout=30)

    gib = 2**20
    rows = []
    for number, (elapsed, log, peak, after, alive) in enumerate(rounds, 1):
        statuses = collections.Counter(str(s) for s, _, _ in log)
        ok = sorted(t for s, t, _ in log if s == 200)
        rows.append([number, args.replicas, args.clients, f"{elapsed:.0f}", len(log), f"{len(ok) / elapsed:.2f}",
                     f"{statistics.median(ok):.2f}" if ok else "n/a",
                     f"{ok[min(len(ok) - 1, int(0.99 * len(ok)))]:.2f}" if ok else "n/a",
                     ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())),
                     f"{baseline / gib:.0f} / {peak / gib:.0f} / {after / gib:.0f}",
                     "yes" if alive else "NO"])
    print(markdown_table(["round", "replicas", "clients", "seconds", "requests", "answered/s", "p50 s", "p99 s",
                          "by status", "server RSS MiB before / peak / after", "up after"], rows))
    if any(s == 500 for _, log, _, _, _ in rounds for s, _, _ in log) or not all(r[4] for r in rounds):
        sys.exit(1)


if __name__ == "__main__":
    main()
