"""The gRPC codec: OIP's protobuf messages (``inference.GRPCInferenceService``) to typed values and back.

A ``ModelInferRequest`` becomes an :class:`~serving.protocol.types.InferRequest`
straight from its protobuf fields: each input's ``raw_input_contents`` (or its
typed ``contents``) becomes an array with no JSON step, and every output goes
back as ``raw_output_contents``. Errors keep REST's message and map REST's
status to a gRPC code (:data:`GRPC_CODES`).

The stubs are the published ones in ``tritonclient.grpc`` (generated from
Triton's ``grpc_service.proto``, package ``inference``): the same service,
method paths and field numbers that KServe's ``grpc_predict_v2.proto`` was
taken from, plus Triton's repository methods.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import grpc
import numpy as np

# NOTE: the generated modules are untyped; their message classes are Any to mypy.
from tritonclient.grpc import service_pb2 as pb

from serving.errors import InvalidInput
from serving.protocol.tensors import check_shape, datatype_of, from_binary, numpy_dtype, to_binary
from serving.protocol.types import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    RequestedOutput,
    ServerMetadata,
)

# NOTE: the generated classes say they come from module "grpc_service_pb2" (the .proto's
# name), which does not exist, so pickle could not find them. Ray's Serve proxy pickles
# each request to the replica (and the response back) when a call does not take the
# direct-ingress path; the alias makes them importable under that name in every process
# that imports this module.
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

_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""Which ``InferTensorContents`` field carries a datatype's values."""


def grpc_code(status: int) -> grpc.StatusCode:
    """The gRPC code for an error's REST status."""
    code = GRPC_CODES.get(status)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL


def parameters(params: Any) -> dict[str, Any]:
    """An ``InferParameter`` map as plain values."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        which = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, which) if which else None
    return out


def decode_infer(
    request: Any, routing_key: str | None = None, timeout_s: float | None = None
) -> InferRequest:
    """A ``ModelInferRequest`` as a typed request, with no JSON step; ``timeout_s``: what
    is left of the call's gRPC deadline.

    Raises:
        InvalidInput: raw and typed contents do not line up with the inputs, or a
            tensor's values do not fill its shape.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"the request has {len(raw)} raw_input_contents for {len(request.inputs)} inputs; "
            "send one per input, or none"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears more than once")
        shape = check_shape(name, list(tensor.shape))
        numpy_dtype(name, tensor.datatype)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r}: has both contents and raw_input_contents")
            inputs[name] = from_binary(name, raw[i], tensor.datatype, shape)
        else:
            inputs[name] = _from_contents(tensor, shape)
    outputs = [RequestedOutput(o.name, parameters(o.parameters)) for o in request.outputs] or None
    return InferRequest(
        model=request.model_name,
        version=request.model_version or None,
        inputs=inputs,
        outputs=outputs,
        id=request.id,
        parameters=parameters(request.parameters),
        routing_key=routing_key,
        timeout_s=timeout_s if timeout_s is None else max(timeout_s, 1e-3),
    )


def _from_contents(tensor: Any, shape: list[int]) -> np.ndarray:
    """An input's typed ``contents`` as an array of its datatype."""
    name, datatype = tensor.name, tensor.datatype
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} has no contents field; send it in raw_input_contents"
        )
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} takes its values from contents.{field}, "
            f"not contents.{others[0]}"
        )
    values = getattr(tensor.contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(values)} values do not fill shape {shape} ({expected} values)"
        )
    dtype = numpy_dtype(name, datatype)
    if datatype == "BYTES":
        array = np.empty(expected, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if dtype.kind in "iu" and dtype.itemsize < 8:
        # NOTE: the proto widens small ints to 32 bits; a value past the datatype's range is refused.
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def encode_infer(response: InferResponse) -> Any:
    """A typed response as a ``ModelInferResponse``: every output as ``raw_output_contents``."""
    message = pb.ModelInferResponse(model_name=response.model, model_version=response.version, id=response.id)
    for name, value in response.outputs.items():
        array = np.asarray(value)
        datatype = datatype_of(array)
        message.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        message.raw_output_contents.append(to_binary(array, datatype))
    for key, value in response.parameters.items():
        message.parameters[key].double_param = float(value)
    return message


def encode_model_metadata(meta: ModelMetadata) -> Any:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


def encode_server_metadata(meta: ServerMetadata) -> Any:
    return pb.ServerMetadataResponse(name=meta.name, version=meta.version, extensions=meta.extensions)
