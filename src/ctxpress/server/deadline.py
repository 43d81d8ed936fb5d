"""One request's time limit and its client's presence, from the event loop to the generating thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from transformers import StoppingCriteria

from ..errors import CtxpressError


class RequestTimedOut(CtxpressError):
    """A request ran past the server's time limit (answered 504)."""


class ClientGone(Exception):
    """The client disconnected: nobody is left to answer."""


class Deadline:
    """One request's time limit and its client's presence.

    Waiting for the model gives up, and generation stops at the next token,
    once the limit has passed or the client has gone; a forward pass already
    running (prompt compression, prefill) finishes first.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds
        self.gone = threading.Event()

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def over(self) -> bool:
        return self.gone.is_set() or self.expired()

    def check(self) -> None:
        if self.gone.is_set():
            raise ClientGone
        if self.expired():
            raise RequestTimedOut(f"the request ran past this server's time limit of {self.seconds:g} s")

    @contextmanager
    def holding(self, lock: threading.RLock) -> Iterator[None]:
        """Hold ``lock`` (the model), giving up when the request is over."""
        while not lock.acquire(timeout=0.1):
            self.check()
        try:
            self.check()
            yield
        finally:
            lock.release()


class StopAtDeadline(StoppingCriteria):
    """Stops generation when the request's deadline has passed or its client has gone."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.deadline.over(), dtype=torch.bool, device=input_ids.device)


async def watched(request: Request, deadline: Deadline, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a worker thread; if the client disconnects meanwhile, the deadline learns it."""
    work = asyncio.ensure_future(run_in_threadpool(fn, *args))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.25)
            if done:
                return work.result()
            if not deadline.gone.is_set() and await request.is_disconnected():
                deadline.gone.set()
    except asyncio.CancelledError:  # cancelled from outside (Ray Serve, when the client went): stop the work too
        deadline.gone.set()
        raise


__all__ = ["ClientGone", "Deadline", "RequestTimedOut", "StopAtDeadline", "watched"]
