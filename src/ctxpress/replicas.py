"""Several model replicas behind one HTTP endpoint, on Ray Serve (``ctxpress serve --replicas N``).

One ``ctxpress serve`` process answers one request at a time on its one
model. In front of a production LLM that is too slow, so this module runs
the same application (:func:`ctxpress.server.create_app`, the compressing
proxy included) as N Ray Serve replicas, each loading its own model, behind
Serve's HTTP proxy on one host and port. Serve routes each request to the
less busy of two replicas; the replicas may run on this machine or anywhere
on a Ray cluster (``ray_address``).

What differs from one process: each replica holds ``1 + max_queue``
requests; past that each Serve proxy queues at most ``max_queue`` more and
answers the rest 503 (its own back-pressure, without ``Retry-After``) where
one process answers 429. ``request_timeout`` counts from a request's arrival
at a replica, not at the proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import CtxpressError, InputError
from .progress import progress_bar

APP_NAME = "ctxpress"
START_TIMEOUT = 600.0  # seconds for every replica to load its model before serve gives up


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: the model to load and the ``create_app`` keyword arguments."""

    model: str
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None  # torch threads per replica (None: torch's default)
    app_options: dict[str, Any] = field(default_factory=dict)

    def build(self):
        """The ASGI application of one replica; runs inside the replica, so the model loads there."""
        import torch

        from .memory import map_large_blocks
        from .models import load_model
        from .server import create_app

        map_large_blocks()

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        return create_app(load_model(self.model, device=self.device, dtype=self.dtype), **self.app_options)


def default_threads(replicas: int) -> int:
    """Torch threads per replica on this machine: the cores this process may use, shared evenly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // replicas)


def deployment(spec: ReplicaSpec, replicas: int, max_queue: int | None):
    """The Ray Serve application: ``replicas`` copies of ``spec``'s app, one model each."""
    from ray import serve

    def build():  # a plain function: Serve calls it in each replica, not here
        return spec.build()

    resources: dict[str, float] = {"num_cpus": spec.threads or 1}
    if spec.device and spec.device.startswith("cuda"):
        resources["num_gpus"] = 1
    bounded = max_queue is not None
    wrapped = serve.deployment(
        serve.ingress(build)(), name=APP_NAME, num_replicas=replicas, ray_actor_options=resources,
        # one request computes while max_queue wait in a replica (the app's own lock and queue) ...
        max_ongoing_requests=1 + max_queue if bounded else 1_000_000,
        # ... and at most max_queue more wait in Serve for a free replica
        max_queued_requests=max_queue if bounded else -1)
    return wrapped.bind()


def _replica_states(serve) -> tuple[int, str | None]:
    """(replicas running, failure message or None) of the ctxpress application."""
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return 0, None
    dep = app.deployments.get(APP_NAME)
    running = dep.replica_states.get("RUNNING", 0) if dep else 0
    if str(app.status).endswith("DEPLOY_FAILED"):
        message = (dep.message if dep and dep.message else app.message) or "deployment failed"
        return running, message
    return running, None


def _first_error_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["unknown error"])[-1]


def serve_replicas(spec: ReplicaSpec, replicas: int, host: str = "127.0.0.1", port: int = 8000, *,
                   max_queue: int | None = None, ray_address: str | None = None,
                   progress: bool | None = None) -> None:
    """Start Ray (or join ``ray_address``), deploy ``replicas`` replicas of ``spec`` on ``host:port`` and
    serve until interrupted; then shut Serve down. Start-up shows a bar of the replicas that have
    loaded their model; a replica that cannot start ends it with a one-line error."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise CtxpressError(f"--replicas needs Ray Serve ({exc.name} is missing): "
                            "pip install 'ctxpress[ray]'") from None
    if max_queue == 0:
        raise InputError("--max-queue 0 cannot be combined with --replicas (Ray Serve queues at least one "
                         "request); give 1 or more")
    if ray_address is None:
        _check_free(host, port)  # Serve's proxy would only log it, after every replica had loaded
    try:
        ray.init(address=ray_address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CtxpressError(f"cannot start or join Ray ({ray_address or 'local'}): "
                            f"{_first_error_line(str(exc) or type(exc).__name__)}") from None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so that a terminated server still shuts Ray down
    try:
        _check_resources(ray, spec, replicas)
        serve.start(http_options={"host": host, "port": port})
        failure: list[BaseException] = []

        def run() -> None:
            try:
                serve.run(deployment(spec, replicas, max_queue), name=APP_NAME, route_prefix="/")
            except BaseException as exc:  # reported by the loop below
                failure.append(exc)

        starter = threading.Thread(target=run, daemon=True)
        starter.start()
        deadline = time.monotonic() + START_TIMEOUT
        with progress_bar(replicas, progress, "starting replicas (model load)", "replica") as bar:
            while True:
                running, message = _replica_states(serve)
                bar.update(running - bar.n)
                if message is not None or failure:
                    detail = message or str(failure[0])
                    raise CtxpressError(f"a replica could not start: {_first_error_line(detail)}")
                if running >= replicas and not starter.is_alive():
                    break
                if time.monotonic() > deadline:
                    raise CtxpressError(f"{running} of {replicas} replicas started within {START_TIMEOUT:.0f} s "
                                        "(does the Ray cluster have the CPUs or GPUs they ask for?)")
                time.sleep(0.5)
        print(f"ctxpress: serving on http://{host}:{port} with {replicas} replicas (Ray Serve); Ctrl-C stops",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ray_address is None:  # our own Ray: all of it goes
            serve.shutdown()
        else:  # a shared cluster: only this application
            serve.delete(APP_NAME)
        ray.shutdown()


def _check_resources(ray, spec: ReplicaSpec, replicas: int) -> None:
    """Refuse at once what the cluster cannot place, instead of waiting for replicas that never start."""
    total = ray.cluster_resources()
    wanted = {"CPU": replicas * (spec.threads or 1)}
    if spec.device and spec.device.startswith("cuda"):
        wanted["GPU"] = replicas
    for kind, amount in wanted.items():
        if total.get(kind, 0) < amount:
            raise InputError(f"{replicas} replicas need {amount:g} {kind}s and this Ray cluster has "
                             f"{total.get(kind, 0):g}; lower --replicas or --threads")


def _check_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CtxpressError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


__all__ = ["ReplicaSpec", "default_threads", "deployment", "serve_replicas"]
