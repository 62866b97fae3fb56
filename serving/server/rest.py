"""OIP over REST: routes, body limits and the REST codecs around the data plane.

A transport (the raw ASGI server, a Ray Serve replica) turns what it received
into an :class:`HttpRequest`, calls :meth:`RestApi.handle` and sends the
:class:`~serving.protocol.rest.Reply` back; it holds no route logic of its own::

    ASGI (serving.server.asgi) ── HttpRequest ── RestApi.handle ── match (routes)
                                                     │
                        protocol.rest: body -> InferRequest, InferResponse -> Reply
                                                     │
                                               DataPlane (serving.dataplane)

Body limits (``max_body_bytes``, enforced while the body is read), the body
timeout and root-path stripping live here, once. Path segments are
percent-decoded after routing, so ``/v2/models/iris%2Fversions%2F7/infer``
names the model ``iris/versions/7`` (refused, 400), not version 7 of ``iris``.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from serving.dataplane import DataPlane
from serving.errors import MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout
from serving.protocol import rest
from serving.protocol.types import InferRequest

_INFERENCE_HEADER = rest.INFERENCE_HEADER.lower()


@dataclass(frozen=True)
class HttpRequest:
    """What a transport hands the REST API: no framework types, header names lower-case."""

    method: str
    path: str
    """The path as sent (percent-encoded), without the query string."""
    headers: Mapping[str, str]
    body: Callable[[], AsyncIterator[bytes]]
    """Yields the body's chunks as they arrive."""
    root_path: str = ""


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str


def _route(method: str, path: str, name: str) -> Route:
    # NOTE: a segment is anything up to the next "/" (or ":" before v1's verb); its value is
    # percent-decoded and checked by the data plane, so a bad name is a 400, not a 404.
    regex = re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m.group(1)}>[^/:]+)", path)
    return Route(method, re.compile(f"^{regex}$"), name)


ROUTES = [
    _route("GET", "/v2/health/live", "live"),
    _route("GET", "/v2/health/ready", "ready"),
    _route("GET", "/v2", "server_metadata"),
    _route("GET", "/v2/repository/index", "repository_index"),
    _route("POST", "/v2/repository/index", "repository_index"),
    _route("POST", "/v2/repository/models/{model}/load", "load"),
    _route("POST", "/v2/repository/models/{model}/unload", "unload"),
    _route("GET", "/v2/models/{model}", "model_metadata"),
    _route("GET", "/v2/models/{model}/versions/{version}", "model_metadata"),
    _route("GET", "/v2/models/{model}/ready", "model_ready"),
    _route("GET", "/v2/models/{model}/versions/{version}/ready", "model_ready"),
    _route("POST", "/v2/models/{model}/infer", "infer"),
    _route("POST", "/v2/models/{model}/versions/{version}/infer", "infer"),
    _route("POST", "/v1/models/{model}:predict", "predict_v1"),
]


def match(method: str, path: str) -> tuple[str, dict[str, str]]:
    """Find the route for a request, or raise NotFound / MethodNotAllowed.

    Returns the route's name and its path parameters, percent-decoded (a fresh dict).
    """
    if len(path) <= _CACHED_PATH_CHARS:
        name, params = _match_cached(method, path)
        return name, dict(params)
    return _match(method, path)


_CACHED_PATH_CHARS = 256
"""Paths up to this long are matched once (a bounded cache): the same few paths come again
and again, and matching one tries every route's pattern in turn."""


@functools.lru_cache(maxsize=256)
def _match_cached(method: str, path: str) -> tuple[str, dict[str, str]]:
    return _match(method, path)


def _match(method: str, path: str) -> tuple[str, dict[str, str]]:
    path = path.rstrip("/") or "/"
    allowed = False
    for route in ROUTES:
        m = route.pattern.match(path)
        if m:
            if route.method == method:
                return route.name, {k: unquote(v) for k, v in m.groupdict().items()}
            allowed = True
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on {path}")
    raise NotFound(f"no route for {method} {path}")


class RestApi:
    """Every REST route of the inference protocol, over one data plane.

    Example::

        api = RestApi(DataPlane(config, {"iris": LocalModel(service)}, LocalLoads(...)))
        reply = await api.handle(HttpRequest("GET", "/v2/health/ready", {}, no_body))
    """

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.config = plane.config
        self._routing_header = plane.config.routing_header.lower()
        self._routes: dict[str, Callable[..., Awaitable[rest.Reply]]] = {
            "live": self._live,
            "ready": self._ready,
            "server_metadata": self._server_metadata,
            "repository_index": self._repository_index,
            "load": self._load,
            "unload": self._unload,
            "model_metadata": self._model_metadata,
            "model_ready": self._model_ready,
            "infer": self._infer,
            "predict_v1": self._predict_v1,
        }

    async def handle(self, request: HttpRequest) -> rest.Reply:
        """Answer one request; never raises (errors become replies through rest.error_reply)."""
        try:
            path = request.path
            # NOTE: under a route prefix other than "/", ASGI servers keep it in the path.
            root = request.root_path
            if root and path.startswith(root):
                path = path[len(root) :]
            route, params = match(request.method, path)
            return await self._routes[route](request, **params)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            return rest.error_reply(exc)

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

    # -- routes --------------------------------------------------------------------
    async def _live(self, request: HttpRequest) -> rest.Reply:
        return rest.ok({"live": await self.plane.live()})

    async def _ready(self, request: HttpRequest) -> rest.Reply:
        ready = await self.plane.ready()
        return rest.ok({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, request: HttpRequest) -> rest.Reply:
        return rest.encode_server_metadata(self.plane.server_metadata())

    async def _model_metadata(
        self, request: HttpRequest, model: str, version: str | None = None
    ) -> rest.Reply:
        return rest.encode_model_metadata(await self.plane.model_metadata(model, version))

    async def _model_ready(self, request: HttpRequest, model: str, version: str | None = None) -> rest.Reply:
        ready = await self.plane.model_ready(model, version)
        return rest.ok({"name": model, "ready": ready}, status=200 if ready else 503)

    async def _infer(self, request: HttpRequest, model: str, version: str | None = None) -> rest.Reply:
        self.plane.model(model)
        body = await self.read_body(request)
        decoded: list[InferRequest] = []

        def decode() -> InferRequest:
            length = request.headers.get(_INFERENCE_HEADER)
            payload, binary = rest.split_body(body, self.config.max_body_bytes, length)
            key = request.headers.get(self._routing_header)
            decoded.append(rest.decode_v2(payload, binary, model=model, version=version, routing_key=key))
            return decoded[0]

        response = await self.plane.infer_wire(model, version, decode)
        return rest.encode_v2(response, decoded[0])

    async def _predict_v1(self, request: HttpRequest, model: str) -> rest.Reply:
        self.plane.model(model)
        body = await self.read_body(request)

        def decode() -> InferRequest:
            payload = rest.parse_json(body, self.config.max_body_bytes)
            return rest.decode_v1(payload, model=model, routing_key=request.headers.get(self._routing_header))

        return rest.encode_v1(await self.plane.infer_wire(model, None, decode))

    async def _repository_index(self, request: HttpRequest) -> rest.Reply:
        return rest.ok(await self.plane.index())

    async def _load(self, request: HttpRequest, model: str) -> rest.Reply:
        entry, done = await self.plane.load(model, request.headers.get("authorization"))
        return rest.ok(entry, status=200 if done else 202)

    async def _unload(self, request: HttpRequest, model: str) -> rest.Reply:
        return rest.ok(await self.plane.unload(model, request.headers.get("authorization")))
