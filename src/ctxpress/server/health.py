"""``GET /healthz``: open to load balancers (no key), and says which process answered."""

from __future__ import annotations

import os

from fastapi import APIRouter

from ..models import LoadedModel
from ..proxy import Upstream


def router(lm: LoadedModel, upstream: Upstream | None) -> APIRouter:
    """The route; it never waits for the model, so a busy server still answers it."""
    routes = APIRouter()

    @routes.get("/healthz")
    def healthz() -> dict:
        # pid: which process (replica) answered, behind ``--replicas``
        return {"status": "ok", "model": lm.name, "pid": os.getpid(),
                **({"upstream": upstream.url} if upstream else {})}

    return routes


__all__ = ["router"]
