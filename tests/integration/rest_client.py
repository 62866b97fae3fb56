"""A ModelService behind the real REST transport, in process: bytes in, a Reply out, no server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from serving.dataplane import DataPlane
from serving.protocol.rest import Reply
from serving.runtime.service import ModelService
from serving.server.local import LocalModel
from serving.server.rest import HttpRequest, RestApi


def _call(
    service: ModelService, method: str, path: str, body: bytes, headers: Mapping[str, str] | None
) -> Reply:
    api = RestApi(DataPlane(service.app, {service.config.name: LocalModel(service)}, loads=None))  # type: ignore[arg-type]

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    return asyncio.run(api.handle(HttpRequest(method, path, lowered, chunks)))


def infer_v2(
    service: ModelService, body: bytes, version: str | None = None, headers: Mapping[str, str] | None = None
) -> Reply:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` with ``body``."""
    base = f"/v2/models/{service.config.name}"
    path = f"{base}/versions/{version}/infer" if version else f"{base}/infer"
    return _call(service, "POST", path, body, headers)


def predict_v1(service: ModelService, body: bytes, headers: Mapping[str, str] | None = None) -> Reply:
    return _call(service, "POST", f"/v1/models/{service.config.name}:predict", body, headers)
