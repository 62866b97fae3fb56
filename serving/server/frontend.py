"""The front end: every route handler, written once, over two small ports.

A transport (the raw ASGI server, a Ray Serve replica, OIP over gRPC on either)
turns what it received into an :class:`HttpRequest`, calls :meth:`Frontend.handle`
and sends the :class:`serving.api.Reply` back; it holds no route logic of its own::

    transport adapter  (serving.standalone, serving.app, serving.server.oip_grpc)
        │ HttpRequest: method, path, root path, headers, body chunks
        ▼
    Frontend.handle ── api.match (routes) ── handler ── api.error_reply (the one handler)
        │                                       │
        ▼                                       ▼
    ModelPort per model                      LoadPort
    infer, predict_v1, metadata,             request a check, wait until done,
    ready, status                            snapshot of what each replica serves

Body limits (``max_body_bytes``, enforced while the body is read), the body
timeout, root-path stripping, the admin token of ``POST .../load`` and load
coordination (at most one forced check in flight per model) live here, once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from serving import api
from serving.config import AppConfig
from serving.errors import (
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from serving.service import index_entry

log = logging.getLogger("serving.frontend")

LOAD_TIMEOUT_S = 30.0
"""How long ``POST .../load`` waits for every replica's check before answering 202."""


@dataclass(frozen=True)
class HttpRequest:
    """What a transport hands the front end: no framework types, header names lower-case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Callable[[], AsyncIterator[bytes]]
    """Yields the body's chunks as they arrive."""
    root_path: str = ""


class ModelPort(Protocol):
    """One model, wherever it runs (this process, another Ray replica)."""

    async def infer(
        self, body: bytes, version: str | None, headers: Mapping[str, str] | None
    ) -> api.Reply: ...

    async def predict_v1(self, body: bytes, headers: Mapping[str, str] | None = None) -> api.Reply: ...

    async def metadata(self, version: str | None) -> api.Reply: ...

    async def ready(self, version: str | None) -> bool: ...

    async def status(self) -> dict[str, Any]: ...


class LoadPort(Protocol):
    """Load requests and what each replica reports, for every model."""

    async def request(self, model: str) -> int:
        """Ask every replica of ``model`` to check its alias now; returns the request's generation."""
        ...

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        """Wait until every replica of ``model`` has finished the check of ``generation``."""
        ...

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model, per replica id: its status (live and target version, generation, ...)."""
        ...


class Frontend:
    """Every route of the HTTP API, over model ports and a load port.

    Example::

        frontend = Frontend(config, {"iris": LocalModel(service)}, LocalLoads(...))
        reply = await frontend.handle(HttpRequest("GET", "/v2/health/ready", {}, no_body))

    Args:
        config: the app config (body limit and timeout, models for the index).
        models: a port per served model name.
        loads: load requests and replica snapshots.
        admin_token: when set, ``POST .../load`` requires ``Authorization: Bearer <token>``.
    """

    def __init__(
        self,
        config: AppConfig,
        models: Mapping[str, ModelPort],
        loads: LoadPort,
        *,
        admin_token: str | None = None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.models = dict(models)
        self.loads = loads
        self._admin_token = admin_token.encode() if admin_token else None
        self._load_timeout_s = load_timeout_s
        self._routing_header = config.routing_header.lower()
        self._waits: dict[tuple[str, int], asyncio.Task[bool]] = {}
        self._routes: dict[str, Callable[..., Any]] = {
            "live": self._live,
            "ready": self._ready,
            "server_metadata": self._server_metadata,
            "repository_index": self._repository_index,
            "load": self._load,
            "model_metadata": self._model_metadata,
            "model_ready": self._model_ready,
            "infer": self._infer,
            "predict_v1": self._predict_v1,
        }

    async def handle(self, request: HttpRequest) -> api.Reply:
        """Answer one request; never raises (errors become replies through api.error_reply)."""
        try:
            path = request.path
            # NOTE: under a route prefix other than "/", ASGI servers keep it in the path.
            root = request.root_path
            if root and path.startswith(root):
                path = path[len(root) :]
            route, params = api.match(request.method, path)
            reply: api.Reply = await self._routes[route](request, **params)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        return reply

    # -- request parts --------------------------------------------------------------
    async def read_body(self, request: HttpRequest) -> bytes:
        """The whole body, refused as soon as it passes ``max_body_bytes`` or ``body_timeout_s``."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                async for chunk in request.body():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError as exc:
            raise RequestTimeout(
                f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            ) from exc
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _model_headers(self, request: HttpRequest) -> dict[str, str] | None:
        """The headers a model reads: the codec's and the canary routing header, no others.

        NOTE: only these cross to a model port (maybe another process), not the whole request's.
        """
        out: dict[str, str] = {}
        length = request.headers.get(_INFERENCE_HEADER)
        if length is not None:
            out[api.INFERENCE_HEADER] = length
        sticky = request.headers.get(self._routing_header)
        if sticky is not None:
            out[self._routing_header] = sticky
        return out or None

    def _model(self, name: str) -> ModelPort:
        port = self.models.get(name)
        if port is None:
            raise ModelNotFound(
                f"model {name!r} is not served here; served: {', '.join(sorted(self.models))}"
            )
        return port

    def _authorize(self, request: HttpRequest) -> None:
        if self._admin_token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this route needs 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(token.strip().encode(), self._admin_token):
            raise Forbidden("the bearer token is not the admin token")

    # -- routes --------------------------------------------------------------------
    async def _live(self, request: HttpRequest) -> api.Reply:
        return api.ok({"live": True})

    async def _ready(self, request: HttpRequest) -> api.Reply:
        states = await asyncio.gather(*(port.ready(None) for port in self.models.values()))
        ready = all(states)
        return api.ok({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, request: HttpRequest) -> api.Reply:
        from serving import __version__

        return api.ok({"name": "serving", "version": __version__, "extensions": api.EXTENSIONS})

    async def _model_metadata(
        self, request: HttpRequest, model: str, version: str | None = None
    ) -> api.Reply:
        return await self._model(model).metadata(version)

    async def _model_ready(self, request: HttpRequest, model: str, version: str | None = None) -> api.Reply:
        ready = await self._model(model).ready(version)
        return api.ok({"name": model, "ready": ready}, status=200 if ready else 503)

    async def _infer(self, request: HttpRequest, model: str, version: str | None = None) -> api.Reply:
        port = self._model(model)
        body = await self.read_body(request)
        return await port.infer(body, version, self._model_headers(request))

    async def _predict_v1(self, request: HttpRequest, model: str) -> api.Reply:
        port = self._model(model)
        body = await self.read_body(request)
        return await port.predict_v1(body, self._model_headers(request))

    async def _repository_index(self, request: HttpRequest) -> api.Reply:
        return api.ok(await self._index())

    async def _index(self) -> list[dict[str, Any]]:
        snap = await self.loads.snapshot()
        return [index_entry(cfg, snap.get(cfg.name, {})) for cfg in self.config.models]

    async def _load(self, request: HttpRequest, model: str) -> api.Reply:
        self._authorize(request)
        self._model(model)
        generation = await self.loads.request(model)
        # NOTE: concurrent load requests that got the same generation share one wait, so a
        # flood of them holds one waiter per model, not one per request.
        key = (model, generation)
        wait = self._waits.get(key)
        if wait is None:
            wait = asyncio.ensure_future(self.loads.wait_done(model, generation, self._load_timeout_s))
            self._waits[key] = wait
            wait.add_done_callback(lambda _: self._waits.pop(key, None))
        done = await asyncio.shield(wait)
        entry = next(e for e in await self._index() if e["name"] == model)
        return api.ok(entry, status=200 if done else 202)


_INFERENCE_HEADER = api.INFERENCE_HEADER.lower()
