"""HTTP API: Open Inference Protocol v2 and the simple v1 JSON route.

Everything here is plain Python over bytes and numpy: the Ray layer calls it,
and unit tests drive it directly. One error handler maps the error tree to
``{"error": "..."}`` with the error's status.

Infer requests and replies also speak the OIP binary tensor data extension (as
Triton and KServe define it): with the header ``Inference-Header-Content-Length: N``
the first N bytes of the body are the JSON inference header and the rest is raw
tensor data, little-endian and row-major, one block per input that carries
``"parameters": {"binary_data_size": K}`` instead of ``data``, in input order.
BYTES elements are each a 4-byte little-endian length and the bytes. An output is
returned the same way when the request asks with ``"binary_data": true`` in the
output's parameters, or ``"binary_data_output": true`` in the request's.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import orjson

from serving.errors import InvalidInput, MethodNotAllowed, NotFound, PayloadTooLarge, ServingError
from serving.formats.base import NUMPY_TO_OIP, OIP_TO_NUMPY, oip_datatype
from serving.manifest import TensorSpec

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
INFERENCE_HEADER = "Inference-Header-Content-Length"
"""The binary extension's HTTP header: the length of the JSON part of the body."""
EXTENSIONS = ["model_repository", "binary_tensor_data"]
"""What server metadata lists under ``extensions`` (Triton's names)."""

log = logging.getLogger("serving.api")


# -- responses ------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (``Inference-Header-Content-Length`` for binary outputs)."""


def ok(payload: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))


def error_reply(exc: Exception) -> Reply:
    """The one error handler: client mistakes are 4xx with a message, never a 500.

    Anything that is not a :class:`ServingError` is a bug or a server fault: it is
    logged here, once, with its traceback, and answered 500 without details.
    """
    if isinstance(exc, ServingError):
        # NOTE: a 503 that says when to come back (Overloaded) lets clients back off, not hammer.
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else {}
        return Reply(exc.status_code, orjson.dumps({"error": exc.message}), headers=headers)
    log.error("unexpected error while answering a request", exc_info=exc)
    return Reply(500, orjson.dumps({"error": f"internal error: {type(exc).__name__}"}))


# -- requests --------------------------------------------------------------------
def parse_json(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {limit}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc


def header_value(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Look a header up by name, ignoring case (plain dicts as well as Starlette's Headers)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def parse_infer_body(
    body: bytes, limit: int, headers: Mapping[str, str] | None = None
) -> tuple[Any, memoryview]:
    """Split an infer request body into its decoded JSON header and the binary tensor data after it.

    Without ``Inference-Header-Content-Length`` the whole body is JSON and the
    binary part is empty. The size limit applies to the whole body.

    Raises:
        PayloadTooLarge: the body is over ``limit``.
        InvalidInput: the header is not a length within the body, or the JSON is malformed.
    """
    raw = header_value(headers, INFERENCE_HEADER)
    if raw is None:
        return parse_json(body, limit), memoryview(b"")
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {limit}")
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInput(f"{INFERENCE_HEADER} must be a non-negative integer, got {raw!r}")
    size = int(raw)
    if size > len(body):
        raise InvalidInput(f"{INFERENCE_HEADER} is {size} but the request body is only {len(body)} bytes")
    view = memoryview(body)
    try:
        payload = orjson.loads(view[:size])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON in the first {size} bytes ({INFERENCE_HEADER}): {exc}") from exc
    return payload, view[size:]


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    id: str
    parameters: dict[str, Any]
    binary_output: bool = False
    """The request's ``binary_data_output``: outputs default to binary data."""
    output_binary: dict[str, bool] = field(default_factory=dict)
    """Per-output ``binary_data``, where the request set it (overrides ``binary_output``)."""

    def wants_binary(self, output: str) -> bool:
        return self.output_binary.get(output, self.binary_output)


def parse_v2(payload: Any, specs: list[TensorSpec], binary: bytes | memoryview = b"") -> InferRequest:
    """Decode an OIP v2 infer request against the model's input specs.

    ``binary`` is the body after the JSON header (see :func:`parse_infer_body`):
    inputs with ``binary_data_size`` take their bytes from it, in input order,
    and every byte must be taken.
    """
    if not isinstance(payload, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    by_name = {s.name: s for s in specs}
    decoded: dict[str, np.ndarray] = {}
    tail = memoryview(binary)
    offset = 0
    for item in raw_inputs:
        name, array, offset = _decode_tensor(item, tail, offset)
        spec = by_name.get(name)
        if spec is None and len(specs) == 1 and len(raw_inputs) == 1:
            spec = specs[0]  # NOTE: single-input models accept any input name
        if spec is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are: {known}")
        decoded[spec.name] = _conform(array, spec)
    missing = set(by_name) - set(decoded)
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(sorted(missing))}")
    if offset != len(tail):
        raise InvalidInput(
            f"the request carries {len(tail)} bytes of binary data after the JSON header, "
            f"but its inputs' binary_data_size add up to {offset}"
        )
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    binary_output = _flag(params, "binary_data_output", "request parameters")
    names, output_binary = _requested_outputs(payload.get("outputs"))
    req_id = payload.get("id")
    return InferRequest(
        decoded,
        names,
        str(req_id) if req_id is not None else request_id(),
        params,
        binary_output=binary_output,
        output_binary=output_binary,
    )


_ids = random.Random()  # noqa: S311 -- NOTE: a request id, not a secret
"""Our own generator: model code may seed the global one, which would repeat ids."""
os.register_at_fork(after_in_child=_ids.seed)


def request_id() -> str:
    """A random UUID for a request that brought no ``id``.

    NOTE: ``uuid.uuid4()`` reads ``os.urandom``, which releases the GIL for its
    syscall; on a replica whose event-loop thread is busy, taking the GIL back
    cost 0.6 ms a request (py-spy: 9% of a replica's samples). ``random`` is
    reseeded in forked children (``_ids`` too), and an id need not be unguessable.
    """
    return str(uuid.UUID(int=_ids.getrandbits(128), version=4))


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: {key!r} must be true or false")
    return value


def _requested_outputs(outputs: Any) -> tuple[list[str] | None, dict[str, bool]]:
    if outputs is None:
        return None, {}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    names = [str(o["name"]) for o in outputs]
    binary: dict[str, bool] = {}
    for name, o in zip(names, outputs, strict=True):
        params = o.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"output {name!r}: 'parameters' must be an object")
        if "binary_data" in params:
            binary[name] = _flag(params, "binary_data", f"output {name!r}")
    return names, binary


def _decode_tensor(item: Any, binary: memoryview, offset: int) -> tuple[str, np.ndarray, int]:
    """Decode one request input; returns its name, array and the offset after its binary data."""
    if not isinstance(item, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    for key in ("name", "shape", "datatype"):
        if key not in item:
            raise InvalidInput(f"input is missing {key!r}")
    name, shape, datatype = item["name"], item["shape"], item["datatype"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
    dtype = np.dtype(OIP_TO_NUMPY[datatype])
    expected = math.prod(shape)
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"input {name!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in item:
            raise InvalidInput(f"input {name!r}: has both 'data' and parameters.binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size} runs past the binary data "
                f"({len(binary) - offset} of {len(binary)} bytes left after the JSON header"
                f"{'' if binary else f'; send the {INFERENCE_HEADER} header'})"
            )
        chunk = binary[offset : offset + size]
        array = _from_binary(str(name), chunk, datatype, dtype, expected)
        return str(name), array.reshape(shape), offset + size
    if "data" not in item:
        raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    data = item["data"]
    fast = _fast_numeric(data, dtype, expected)
    if fast is not None:
        array = fast
    else:
        try:
            array = np.asarray(data, dtype=dtype)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"input {name!r}: data does not match datatype {datatype}") from exc
    if array.size != expected:
        raise InvalidInput(
            f"input {name!r}: {array.size} values do not fill shape {shape} ({expected} values)"
        )
    return str(name), array.reshape(shape), offset


def _fast_numeric(data: Any, dtype: np.dtype[Any], count: int) -> np.ndarray | None:
    """A flat or two-level list of numbers as a 1-D array, or None to take the general path.

    ``np.fromiter`` skips ``np.asarray``'s shape discovery over nested Python
    lists (about 1.5-2x faster on 40,000 values). Anything unusual (ragged rows,
    deeper nesting, bad values, a count that does not fill the shape) returns
    None so that ``np.asarray`` decides and reports it.
    """
    if dtype.kind not in "iuf" or not isinstance(data, list) or not data:
        return None
    first = data[0]
    try:
        if isinstance(first, list):
            if not first or isinstance(first[0], list) or len(data) * len(first) != count:
                return None
            if set(map(type, data)) != {list} or set(map(len, data)) != {len(first)}:
                return None
            return np.fromiter(chain.from_iterable(data), dtype=dtype, count=count)
        if len(data) != count:
            return None
        return np.fromiter(data, dtype=dtype, count=count)
    except (ValueError, TypeError, OverflowError):
        return None


def _from_binary(name: str, chunk: memoryview, datatype: str, dtype: np.dtype[Any], count: int) -> np.ndarray:
    if datatype == "BYTES":
        return _bytes_from_binary(name, chunk, count)
    want = count * dtype.itemsize
    if len(chunk) != want:
        raise InvalidInput(
            f"input {name!r}: binary_data_size is {len(chunk)} bytes, but {count} {datatype} "
            f"values take {want}"
        )
    # NOTE: copy out of the request body: a writable array that owns its memory
    # (torch warns on read-only numpy arrays) and does not pin the whole body.
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True)


def _bytes_from_binary(name: str, chunk: memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: {len(items)} BYTES elements do not fill its shape ({count})")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _conform(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Check rank and fixed dimensions; cast between numeric types, refuse the rest."""
    if len(array.shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
    ):
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(array.shape)} does not match the model's {spec.shape}"
        )
    want = np.dtype(OIP_TO_NUMPY[spec.datatype])
    if array.dtype == want:
        return array
    numeric = "biuf"
    if array.dtype.kind in numeric and want.kind in numeric:
        return array.astype(want)
    raise InvalidInput(
        f"input {spec.name!r}: datatype {oip_datatype(array.dtype)} "
        f"does not match the model's {spec.datatype}"
    )


def parse_v1(payload: Any, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Decode ``{"instances": [...]}`` for a single-input model."""
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise InvalidInput("request body must be a JSON object with an 'instances' list")
    if len(specs) != 1:
        raise InvalidInput("the v1 route serves single-input models; use /v2 for this one")
    spec = specs[0]
    instances = payload["instances"]
    if not instances:
        raise InvalidInput("'instances' is empty")
    try:
        array = np.asarray(instances, dtype=np.dtype(OIP_TO_NUMPY[spec.datatype]))
    except (ValueError, TypeError, OverflowError) as exc:
        # NOTE: OverflowError: an integer too large for the model's datatype (2**64 into INT64).
        raise InvalidInput(f"instances do not form a {spec.datatype} array of one shape") from exc
    return {spec.name: _conform(array, spec)}


def encode_outputs(outputs: dict[str, np.ndarray], wanted: list[str] | None) -> list[dict[str, Any]]:
    """The JSON ``outputs`` list (every output's values in ``data``)."""
    return _encode_outputs(outputs, wanted, lambda name: False, [])


def infer_reply(model_name: str, version: str, req: InferRequest, outputs: dict[str, np.ndarray]) -> Reply:
    """The OIP v2 infer response; binary outputs where the request asked for them.

    With any binary output the body is the JSON header followed by the outputs'
    bytes, ``content-type`` is ``application/octet-stream`` and the reply carries
    ``Inference-Header-Content-Length``; otherwise it is plain JSON.
    """
    chunks: list[bytes] = []
    payload = {
        "model_name": model_name,
        "model_version": version,
        "id": req.id,
        "outputs": _encode_outputs(outputs, req.outputs, req.wants_binary, chunks),
    }
    head = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return Reply(200, head)
    return Reply(200, b"".join([head, *chunks]), OCTET_STREAM, {INFERENCE_HEADER: str(len(head))})


def _encode_outputs(
    outputs: dict[str, np.ndarray],
    wanted: list[str] | None,
    binary: Callable[[str], bool],
    chunks: list[bytes],
) -> list[dict[str, Any]]:
    """Describe each output; binary ones append their bytes to ``chunks`` in order."""
    names = wanted if wanted is not None else list(outputs)
    result = []
    for name in names:
        if name not in outputs:
            raise InvalidInput(f"unknown output {name!r}; the model produces: {', '.join(outputs)}")
        array = np.asarray(outputs[name])
        datatype = NUMPY_TO_OIP.get(str(array.dtype), "BYTES")
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
        data = array.reshape(-1)
        if binary(name):
            raw = to_binary(data, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data.astype(str) if datatype == "BYTES" else data
        result.append(entry)
    return result


def to_binary(data: np.ndarray, datatype: str) -> bytes:
    """A flat array as the binary extension's bytes: little-endian, BYTES length-prefixed."""
    if datatype != "BYTES":
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    parts = []
    for item in data.tolist():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def tensor_metadata(specs: list[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": s.shape} for s in specs]


# -- routing --------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str


_SEG = r"(?P<{}>[A-Za-z0-9][A-Za-z0-9._-]*)"


def _route(method: str, path: str, name: str) -> Route:
    regex = re.sub(r"\{(\w+)\}", lambda m: _SEG.format(m.group(1)), path)
    return Route(method, re.compile(f"^{regex}$"), name)


ROUTES = [
    _route("GET", "/v2/health/live", "live"),
    _route("GET", "/v2/health/ready", "ready"),
    _route("GET", "/v2", "server_metadata"),
    _route("GET", "/v2/repository/index", "repository_index"),
    _route("POST", "/v2/repository/index", "repository_index"),
    _route("POST", "/v2/repository/models/{model}/load", "load"),
    _route("GET", "/v2/models/{model}", "model_metadata"),
    _route("GET", "/v2/models/{model}/versions/{version}", "model_metadata"),
    _route("GET", "/v2/models/{model}/ready", "model_ready"),
    _route("GET", "/v2/models/{model}/versions/{version}/ready", "model_ready"),
    _route("POST", "/v2/models/{model}/infer", "infer"),
    _route("POST", "/v2/models/{model}/versions/{version}/infer", "infer"),
    _route("POST", "/v1/models/{model}:predict", "predict_v1"),
]


def match(method: str, path: str) -> tuple[str, dict[str, str]]:
    """Find the route for a request, or raise NotFound / MethodNotAllowed."""
    path = path.rstrip("/") or "/"
    allowed = False
    for route in ROUTES:
        m = route.pattern.match(path)
        if m:
            if route.method == method:
                return route.name, m.groupdict()
            allowed = True
    if allowed:
        raise MethodNotAllowed(f"{method} is not allowed on {path}")
    raise NotFound(f"no route for {method} {path}")


Handler = Callable[..., Any]
