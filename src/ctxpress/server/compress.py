"""``POST /v1/compress``: the options of ``ctxpress compress --json``, and the same fields back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..models import LoadedModel
from ..prompt import PromptCompressor
from ..request import PromptRequest
from .deadline import Deadline, watched
from .schemas import CompressBody


def router(lm: LoadedModel, compressor: PromptCompressor, request_timeout: float | None) -> APIRouter:
    """The route, bound to the model it takes turns on (its lock) and the compressor on that model."""
    routes = APIRouter()

    @routes.post("/v1/compress")
    async def compress(body: CompressBody, request: Request) -> dict:
        deadline = Deadline(request_timeout)
        # checked here, before the request waits for the model
        asked = PromptRequest.from_mapping(body.model_dump(exclude={"context"}))

        def work() -> dict:
            with deadline.holding(lm.lock):
                return asked.compress(compressor, body.context).to_dict()

        return await watched(request, deadline, work)

    return routes


__all__ = ["router"]
