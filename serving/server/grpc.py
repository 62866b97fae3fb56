"""OIP over gRPC (``inference.GRPCInferenceService``): a thin transport over the data plane.

Each RPC decodes its protobuf message with :mod:`serving.protocol.grpc`, calls
one :class:`serving.dataplane.DataPlane` method, and encodes the result::

    ServerLive / ServerReady        DataPlane.live / ready
    ServerMetadata                  DataPlane.server_metadata
    ModelMetadata / ModelReady      DataPlane.model_metadata / model_ready
    ModelInfer                      DataPlane.infer (protobuf -> arrays, no JSON)
    RepositoryIndex                 DataPlane.index
    RepositoryModelLoad             DataPlane.load

Errors keep REST's message and map its status to a gRPC code
(:func:`serving.protocol.grpc.grpc_code`); a 503 that says when to retry
carries ``retry-after`` in the trailing metadata. The canary's routing key and
the admin token come from the call's metadata, under the same names as REST's
headers.

The servicer works on a ``grpc.aio`` server (the standalone transport) and on
Ray Serve's gRPC ingress (:mod:`serving.server.ray`): both hand it a request
message and a context with ``set_code``, ``set_details``,
``set_trailing_metadata`` and ``invocation_metadata``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

import grpc

# NOTE: the generated modules are untyped; their message classes are Any to mypy.
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from serving.dataplane import DataPlane
from serving.errors import PayloadTooLarge
from serving.protocol import grpc as codec
from serving.protocol.types import describe_error

__all__ = [
    "SERVICER_FUNCTION",
    "InferenceServicer",
    "add_GRPCInferenceServiceServicer_to_server",
    "start_server",
]

SERVICER_FUNCTION = "serving.server.grpc.add_GRPCInferenceServiceServicer_to_server"
"""What Ray Serve's ``grpc_options.grpc_servicer_functions`` names to serve this service."""

T = TypeVar("T")


class Context(Protocol):
    """What the servicer uses of a gRPC context (``grpc.aio`` and Ray Serve's both have it)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: Any) -> None: ...

    def invocation_metadata(self) -> Any: ...


def _remaining(context: Context) -> float | None:
    """Seconds left of the call's deadline, where the context knows it (``grpc.aio``'s does)."""
    remaining = getattr(context, "time_remaining", None)
    value = remaining() if callable(remaining) else None
    return float(value) if isinstance(value, int | float) else None


def _metadata(context: Context) -> dict[str, str]:
    """Text metadata by lower-case key (binary ``-bin`` entries are left out)."""
    return {str(k).lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # NOTE: untyped base
    """``inference.GRPCInferenceService`` over a data plane; methods Triton has and we don't answer
    UNIMPLEMENTED (the generated base class).

    Example::

        server = grpc.aio.server()
        add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
        server.add_insecure_port("127.0.0.1:8001")
        await server.start()
    """

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self._routing_header = plane.config.routing_header.lower()

    @staticmethod
    async def _answer(
        context: Context, empty: Callable[[], Any], call: Callable[[], Awaitable[T]]
    ) -> T | Any:
        """Run ``call``; on an error set its code and message on the context and return ``empty()``."""
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            info = describe_error(exc)
            context.set_code(codec.grpc_code(info.status))
            context.set_details(info.message)
            if info.retry_after_s is not None:
                context.set_trailing_metadata((("retry-after", str(info.retry_after_s)),))
            return empty()

    async def ServerLive(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            return pb.ServerLiveResponse(live=await self.plane.live())

        return await self._answer(context, pb.ServerLiveResponse, call)

    async def ServerReady(self, request: Any, context: Context) -> Any:
        # NOTE: not ready is an answer (ready=false), not an error, as in Triton.
        async def call() -> Any:
            return pb.ServerReadyResponse(ready=await self.plane.ready())

        return await self._answer(context, pb.ServerReadyResponse, call)

    async def ModelReady(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            ready = await self.plane.model_ready(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=ready)

        return await self._answer(context, pb.ModelReadyResponse, call)

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            return codec.encode_server_metadata(self.plane.server_metadata())

        return await self._answer(context, pb.ServerMetadataResponse, call)

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            meta = await self.plane.model_metadata(request.name, request.version or None)
            return codec.encode_model_metadata(meta)

        return await self._answer(context, pb.ModelMetadataResponse, call)

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            limit = self.plane.config.max_body_bytes
            size = request.ByteSize()
            if size > limit:
                raise PayloadTooLarge(f"request body is {size} bytes, over the limit of {limit}")
            key = _metadata(context).get(self._routing_header)
            version = request.model_version or None
            remaining = _remaining(context)
            response = await self.plane.infer_wire(
                request.model_name, version, lambda: codec.decode_infer(request, key, remaining)
            )
            return codec.encode_infer(response)

        return await self._answer(context, pb.ModelInferResponse, call)

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        async def call() -> Any:
            index = pb.RepositoryIndexResponse.ModelIndex
            models = [
                index(name=e["name"], version=e["version"] or "", state=e["state"], reason=e["reason"])
                for e in await self.plane.index()
            ]
            if request.ready:
                models = [m for m in models if m.state == "READY"]
            return pb.RepositoryIndexResponse(models=models)

        return await self._answer(context, pb.RepositoryIndexResponse, call)

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        """Check the model's alias now; OK once every replica has (or the wait ran out: REST's 202).

        NOTE: KServe's ``grpc_predict_v2.proto`` numbers ``model_name`` 1, where Triton's
        has ``repository_name``; with no Triton ``model_name`` (field 2), field 1 names the model.
        """

        async def call() -> Any:
            name = request.model_name or request.repository_name
            _, done = await self.plane.load(name, _metadata(context).get("authorization"))
            if not done:
                context.set_trailing_metadata((("serving-converged", "false"),))
            return pb.RepositoryModelLoadResponse()

        return await self._answer(context, pb.RepositoryModelLoadResponse, call)


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """The generated registration, from this module (:data:`SERVICER_FUNCTION`: Ray imports it)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


async def start_server(
    plane: DataPlane, host: str, port: int, *, reuse_port: bool = False, options: Iterable[Any] = ()
) -> grpc.aio.Server:
    """Start a ``grpc.aio`` server for ``plane`` on the running loop; returns it started.

    The receive limit sits above ``max_body_bytes``, so an oversized request gets
    the same RESOURCE_EXHAUSTED and message as REST; the send limit sits above the
    reply limit (``max_reply_bytes``), which the model service checks first.
    ``reuse_port`` lets several processes share the port (``--workers N``).

    Raises:
        OSError: the port cannot be bound.
    """
    receive = max(4 * 1024**2, 2 * plane.config.max_body_bytes + 1024**2)
    # NOTE: an answer's tensors are bounded by reply_limit before encoding; protobuf adds little.
    send = max(4 * 1024**2, plane.config.reply_limit + 1024**2)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", send),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *options,
        ]
    )
    add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}: {exc}") from exc
    await server.start()
    return server
