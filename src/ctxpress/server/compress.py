"""``POST /v1/compress``: the options of ``ctxpress compress --json``, and the same fields back."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..messages import Tally
from ..models import LoadedModel
from ..prompt import PromptCompressor
from ..request import PromptRequest
from .deadline import Deadline, watched
from .metrics import Metrics
from .schemas import CompressBody


def router(lm: LoadedModel, compressor: PromptCompressor, request_timeout: float | None,
           metrics: Metrics | None = None) -> APIRouter:
    """The route, bound to the model it takes turns on (its lock), the compressor on that model and the
    app's metrics (each compression counted as one compressed message)."""
    metrics = metrics or Metrics()
    routes = APIRouter()

    @routes.post("/v1/compress")
    async def compress(body: CompressBody, request: Request) -> dict:
        deadline = Deadline(request_timeout)
        # checked here, before the request waits for the model
        asked = PromptRequest.from_mapping(body.model_dump(exclude={"context"}))

        def work() -> dict:
            with deadline.holding(lm.lock):
                result = asked.compress(compressor, body.context)
            metrics.compression(Tally(before=result.origin_tokens, after=result.compressed_tokens, compressed=1,
                                      seconds=result.seconds))
            return result.to_dict()

        return await watched(request, deadline, work)

    return routes


__all__ = ["router"]
