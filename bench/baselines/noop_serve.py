"""A Ray Serve no-op: one deployment answering a constant body. The engine's ceiling."""

from __future__ import annotations

from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

BODY = b'{"model_name":"noop","outputs":[]}'


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class NoOp:
    async def __call__(self, request: Request) -> Response:
        await request.body()
        return Response(BODY, media_type="application/json")


def build() -> Any:
    return NoOp.bind()
