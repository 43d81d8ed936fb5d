"""Running the application: in the foreground (``ctxpress serve``) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CtxpressError
from ..models import LoadedModel
from .app import create_app
from .settings import DEFAULT_HOST, DEFAULT_PORT


def serve(lm: LoadedModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> None:
    """Run the service until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lm, **options), host=host, port=port, log_level="info")


@contextmanager
def serving(app, host: str = DEFAULT_HOST) -> Iterator[str]:
    """A real uvicorn server for ``app`` in a background thread on a free port; yields its base URL.

    For tests and benchmarks that talk HTTP to an app in the same process.
    """
    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise CtxpressError(f"the server on {host}:{port} did not start within 30 s")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


__all__ = ["serve", "serving"]
