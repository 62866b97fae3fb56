"""OIP over gRPC (``inference.GRPCInferenceService``): a third thin adapter over the front end.

Each RPC becomes the front end's REST request for the same thing and the
:class:`serving.api.Reply` comes back as the RPC's response, so every route,
limit, message and metric stays written once, in
:class:`serving.server.frontend.Frontend`::

    ServerLive / ServerReady        GET  /v2/health/live, /v2/health/ready
    ServerMetadata                  GET  /v2
    ModelMetadata / ModelReady      GET  /v2/models/{name}[/versions/{v}][/ready]
    ModelInfer                      POST /v2/models/{name}[/versions/{v}]/infer
    RepositoryIndex                 GET  /v2/repository/index
    RepositoryModelLoad             POST /v2/repository/models/{name}/load

``ModelInfer`` is sent as the binary tensor extension: each input's
``raw_input_contents`` (or its typed ``contents``, packed little-endian with
numpy) becomes a block of binary data after a small JSON header, and every
output is asked for as binary data, which becomes ``raw_output_contents``
unchanged. One codec (:mod:`serving.api`) decodes both transports.

Errors keep REST's message and map its status to a gRPC code
(:data:`GRPC_CODES`); a 503 that says when to retry carries ``retry-after``
in the trailing metadata.

The stubs are the published ones in ``tritonclient.grpc`` (generated from
Triton's ``grpc_service.proto``, package ``inference``): the same service,
method paths and field numbers that KServe's ``grpc_predict_v2.proto`` was
taken from, plus Triton's repository methods. The servicer works on a
``grpc.aio`` server (the standalone transport) and on Ray Serve's gRPC ingress
(:mod:`serving.app`): both hand it a request message and a context with
``set_code``, ``set_details``, ``set_trailing_metadata`` and
``invocation_metadata``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

import grpc
import numpy as np
import orjson

# NOTE: the generated modules are untyped; their message classes are Any to mypy.
from tritonclient.grpc import service_pb2 as pb  # type: ignore[import-untyped]  # NOTE: untyped stubs
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # type: ignore[import-untyped]  # NOTE: untyped

from serving import api
from serving.errors import InvalidInput
from serving.formats.base import OIP_TO_NUMPY
from serving.server.frontend import Frontend, HttpRequest

__all__ = [
    "GRPC_CODES",
    "SERVICER_FUNCTION",
    "InferenceServicer",
    "add_GRPCInferenceServiceServicer_to_server",
    "add_to_server",
    "start_server",
]

SERVICER_FUNCTION = "serving.server.oip_grpc.add_GRPCInferenceServiceServicer_to_server"
"""What Ray Serve's ``grpc_options.grpc_servicer_functions`` names to serve this service."""

# NOTE: the generated classes say they come from module "grpc_service_pb2" (the .proto's
# name), which does not exist, so pickle could not find them. Ray's Serve proxy pickles
# each request to the replica (and the response back) when a call does not take the
# direct-ingress path; the alias makes them importable under that name in every process
# that imports this module (the proxy through SERVICER_FUNCTION, replicas through serving.app).
sys.modules.setdefault("grpc_service_pb2", pb)

GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.DATA_LOSS,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}
"""REST status (:mod:`serving.errors`) to gRPC status code; any other 4xx is INVALID_ARGUMENT,
any other 5xx INTERNAL."""

_CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "?"),
    "INT8": ("int_contents", "<i1"),
    "INT16": ("int_contents", "<i2"),
    "INT32": ("int_contents", "<i4"),
    "INT64": ("int64_contents", "<i8"),
    "UINT8": ("uint_contents", "<u1"),
    "UINT16": ("uint_contents", "<u2"),
    "UINT32": ("uint_contents", "<u4"),
    "UINT64": ("uint64_contents", "<u8"),
    "FP32": ("fp32_contents", "<f4"),
    "FP64": ("fp64_contents", "<f8"),
}
"""Which ``InferTensorContents`` field carries a datatype's values, and its little-endian dtype."""


class Context(Protocol):
    """What the servicer uses of a gRPC context (``grpc.aio`` and Ray Serve's both have it)."""

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: Any) -> None: ...

    def invocation_metadata(self) -> Any: ...


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code for a REST status of an error reply."""
    code = GRPC_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL


# -- requests ---------------------------------------------------------------------------
def _params(params: Any) -> dict[str, Any]:
    """An ``InferParameter`` map as the JSON values REST would carry."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out


def _contents_bytes(tensor: Any) -> bytes:
    """An input's typed ``contents`` as the little-endian bytes the binary extension carries."""
    name, datatype = tensor.name, tensor.datatype
    shape = list(tensor.shape)
    present = [field.name for field, _ in tensor.contents.ListFields()]
    if datatype == "BYTES":
        field = "bytes_contents"
    elif datatype in _CONTENTS:
        field = _CONTENTS[datatype][0]
    else:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} has no contents field; send it in raw_input_contents"
        )
    others = [f for f in present if f != field]
    if others:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} takes its values from contents.{field}, "
            f"not contents.{others[0]}"
        )
    values = getattr(tensor.contents, field)
    expected = math.prod(shape) if all(d >= 0 for d in shape) else len(values)
    if len(values) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(values)} values do not fill shape {shape} ({expected} values)"
        )
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in values)
    dtype = np.dtype(_CONTENTS[datatype][1])
    if dtype.kind in "iu" and dtype.itemsize < 8:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
        return wide.astype(dtype).tobytes()
    return np.asarray(values, dtype=dtype).tobytes()


def infer_body(request: Any) -> tuple[bytes, int]:
    """A ``ModelInferRequest`` as a binary-extension infer body; returns it and its JSON header's length.

    Raises:
        InvalidInput: raw and typed contents do not line up with the inputs.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one per input, or none"
        )
    inputs: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "shape": list(tensor.shape),
            "datatype": tensor.datatype,
        }
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {tensor.name!r}: has both contents and raw_input_contents")
            block = raw[i]
        elif tensor.datatype not in OIP_TO_NUMPY:
            # NOTE: let the codec refuse it with REST's message.
            entry["data"] = []
            inputs.append(entry)
            continue
        else:
            block = _contents_bytes(tensor)
        entry["parameters"] = {**_params(tensor.parameters), "binary_data_size": len(block)}
        inputs.append(entry)
        blocks.append(block)
    payload: dict[str, Any] = {
        "inputs": inputs,
        # NOTE: every output comes back as binary data: it becomes raw_output_contents as is.
        "parameters": {**_params(request.parameters), "binary_data_output": True},
    }
    if request.id:
        payload["id"] = request.id
    if request.outputs:
        payload["outputs"] = [
            {"name": o.name, "parameters": {**_params(o.parameters), "binary_data": True}}
            for o in request.outputs
        ]
    head = orjson.dumps(payload)
    return b"".join([head, *blocks]), len(head)


def infer_response(reply: api.Reply) -> Any:
    """A successful infer reply (binary extension) as a ``ModelInferResponse``."""
    raw_len = reply.headers.get(api.INFERENCE_HEADER)
    body = memoryview(reply.body)
    head_len = int(raw_len) if raw_len is not None else len(body)
    payload = orjson.loads(body[:head_len])
    response = pb.ModelInferResponse(
        model_name=payload["model_name"], model_version=payload["model_version"], id=payload["id"]
    )
    offset = head_len
    for out in payload["outputs"]:
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            # NOTE: not expected (every output is asked for as binary); pack it the same way.
            data = np.asarray(out["data"], dtype=OIP_TO_NUMPY.get(out["datatype"], object))
            response.raw_output_contents.append(api.to_binary(data.reshape(-1), out["datatype"]))
            continue
        response.raw_output_contents.append(bytes(body[offset : offset + size]))
        offset += size
    return response


# -- the servicer ---------------------------------------------------------------------------
def _metadata(context: Context) -> dict[str, str]:
    """Text metadata as lower-case headers (binary ``-bin`` entries are left out)."""
    return {str(k).lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _one_chunk(body: bytes) -> Any:
    async def chunks() -> AsyncIterator[bytes]:
        if body:
            yield body

    return chunks


def _model_path(name: str, version: str) -> str:
    return f"/v2/models/{name}/versions/{version}" if version else f"/v2/models/{name}"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]  # NOTE: untyped base
    """``inference.GRPCInferenceService`` over a front end; methods Triton has and we don't answer
    UNIMPLEMENTED (the generated base class).

    Example::

        server = grpc.aio.server()
        add_to_server(InferenceServicer(frontend), server)
        server.add_insecure_port("127.0.0.1:8001")
        await server.start()
    """

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def _call(
        self,
        context: Context,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> api.Reply:
        merged = {**_metadata(context), **(headers or {})}
        return await self.frontend.handle(HttpRequest(method, path, merged, _one_chunk(body)))

    @staticmethod
    def _fail(context: Context, reply: api.Reply, empty: Any) -> Any:
        """Set the error reply's code and REST message on the context; returns the empty response."""
        try:
            message = str(orjson.loads(reply.body)["error"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = reply.body.decode("utf-8", "replace")
        context.set_code(grpc_code(reply.status))
        context.set_details(message)
        retry = reply.headers.get("Retry-After")
        if retry is not None:
            context.set_trailing_metadata((("retry-after", retry),))
        return empty

    async def ServerLive(self, request: Any, context: Context) -> Any:
        reply = await self._call(context, "GET", "/v2/health/live")
        if reply.status != 200:
            return self._fail(context, reply, pb.ServerLiveResponse())
        return pb.ServerLiveResponse(live=bool(orjson.loads(reply.body)["live"]))

    async def ServerReady(self, request: Any, context: Context) -> Any:
        # NOTE: not ready is an answer (ready=false), not an error, as in Triton.
        reply = await self._call(context, "GET", "/v2/health/ready")
        payload = orjson.loads(reply.body)
        if "ready" not in payload:
            return self._fail(context, reply, pb.ServerReadyResponse())
        return pb.ServerReadyResponse(ready=bool(payload["ready"]))

    async def ModelReady(self, request: Any, context: Context) -> Any:
        path = _model_path(request.name, request.version) + "/ready"
        reply = await self._call(context, "GET", path)
        payload = orjson.loads(reply.body)
        if "ready" not in payload:
            return self._fail(context, reply, pb.ModelReadyResponse())
        return pb.ModelReadyResponse(ready=bool(payload["ready"]))

    async def ServerMetadata(self, request: Any, context: Context) -> Any:
        reply = await self._call(context, "GET", "/v2")
        if reply.status != 200:
            return self._fail(context, reply, pb.ServerMetadataResponse())
        payload = orjson.loads(reply.body)
        return pb.ServerMetadataResponse(
            name=payload["name"], version=payload["version"], extensions=payload["extensions"]
        )

    async def ModelMetadata(self, request: Any, context: Context) -> Any:
        reply = await self._call(context, "GET", _model_path(request.name, request.version))
        if reply.status != 200:
            return self._fail(context, reply, pb.ModelMetadataResponse())
        payload = orjson.loads(reply.body)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=payload["name"],
            versions=payload["versions"],
            platform=payload["platform"],
            inputs=[tensor(**t) for t in payload["inputs"]],
            outputs=[tensor(**t) for t in payload["outputs"]],
        )

    async def ModelInfer(self, request: Any, context: Context) -> Any:
        try:
            body, head_len = infer_body(request)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            return self._fail(context, api.error_reply(exc), pb.ModelInferResponse())
        headers = {api.INFERENCE_HEADER.lower(): str(head_len), "content-length": str(len(body))}
        path = _model_path(request.model_name, request.model_version) + "/infer"
        reply = await self._call(context, "POST", path, body, headers)
        if reply.status != 200:
            return self._fail(context, reply, pb.ModelInferResponse())
        return infer_response(reply)

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        reply = await self._call(context, "GET", "/v2/repository/index")
        if reply.status != 200:
            return self._fail(context, reply, pb.RepositoryIndexResponse())
        index = pb.RepositoryIndexResponse.ModelIndex
        models = [
            index(name=e["name"], version=e["version"] or "", state=e["state"], reason=e["reason"])
            for e in orjson.loads(reply.body)
        ]
        if request.ready:
            models = [m for m in models if m.state == "READY"]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        """Check the model's alias now; OK once every replica has (or the wait ran out: REST's 202).

        NOTE: KServe's ``grpc_predict_v2.proto`` numbers ``model_name`` 1, where Triton's
        has ``repository_name``; with no Triton ``model_name`` (field 2), field 1 names the model.
        """
        name = request.model_name or request.repository_name
        reply = await self._call(context, "POST", f"/v2/repository/models/{name}/load")
        if reply.status >= 400:
            return self._fail(context, reply, pb.RepositoryModelLoadResponse())
        if reply.status == 202:
            context.set_trailing_metadata((("serving-converged", "false"),))
        return pb.RepositoryModelLoadResponse()


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: Any) -> None:
    """The generated registration, from this module (:data:`SERVICER_FUNCTION`: Ray imports it)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """Register the servicer's methods on a ``grpc.aio`` server."""
    add_GRPCInferenceServiceServicer_to_server(servicer, server)


async def start_server(
    frontend: Frontend, host: str, port: int, *, reuse_port: bool = False, options: Iterable[Any] = ()
) -> grpc.aio.Server:
    """Start a ``grpc.aio`` server for ``frontend`` on the running loop; returns it started.

    The message size limit sits above the front end's ``max_body_bytes``, so an
    oversized request gets the front end's RESOURCE_EXHAUSTED and message.
    ``reuse_port`` lets several processes share the port (``--workers N``).

    Raises:
        OSError: the port cannot be bound.
    """
    limit = max(4 * 1024**2, 2 * frontend.config.max_body_bytes + 1024**2)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *options,
        ]
    )
    add_to_server(InferenceServicer(frontend), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot serve gRPC on {address}: {exc}") from exc
    await server.start()
    return server
