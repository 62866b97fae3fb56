"""HTTP API: Open Inference Protocol v2 and the simple v1 JSON route.

Everything here is plain Python over bytes and numpy: the Ray layer calls it,
and unit tests drive it directly. One error handler maps the error tree to
``{"error": "..."}`` with the error's status.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.errors import InvalidInput, MethodNotAllowed, NotFound, PayloadTooLarge, ServingError
from serving.formats.base import NUMPY_TO_OIP, OIP_TO_NUMPY, oip_datatype
from serving.manifest import TensorSpec

JSON = "application/json"


# -- responses ------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON


def ok(payload: Any, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY))


def error_reply(exc: Exception) -> Reply:
    """The one error handler: client mistakes are 4xx with a message, never a 500."""
    if isinstance(exc, ServingError):
        return Reply(exc.status_code, orjson.dumps({"error": exc.message}))
    return Reply(500, orjson.dumps({"error": f"internal error: {type(exc).__name__}"}))


# -- requests --------------------------------------------------------------------
def parse_json(body: bytes, limit: int) -> Any:
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes, over the limit of {limit}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from exc


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    id: str
    parameters: dict[str, Any]


def parse_v2(payload: Any, specs: list[TensorSpec]) -> InferRequest:
    """Decode an OIP v2 infer request against the model's input specs."""
    if not isinstance(payload, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    by_name = {s.name: s for s in specs}
    decoded: dict[str, np.ndarray] = {}
    for item in raw_inputs:
        name, array = _decode_tensor(item)
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
    outputs = payload.get("outputs")
    names = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        names = [str(o["name"]) for o in outputs]
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    req_id = payload.get("id")
    return InferRequest(decoded, names, str(req_id) if req_id is not None else str(uuid.uuid4()), params)


def _decode_tensor(item: Any) -> tuple[str, np.ndarray]:
    if not isinstance(item, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    for key in ("name", "shape", "datatype", "data"):
        if key not in item:
            raise InvalidInput(f"input is missing {key!r}")
    name, shape, datatype, data = item["name"], item["shape"], item["datatype"], item["data"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers")
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
    dtype = np.dtype(OIP_TO_NUMPY[datatype])
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input {name!r}: data does not match datatype {datatype}") from exc
    expected = math.prod(shape)
    if array.size != expected:
        raise InvalidInput(
            f"input {name!r}: {array.size} values do not fill shape {shape} ({expected} values)"
        )
    return str(name), array.reshape(shape)


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
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"instances do not form a {spec.datatype} array of one shape") from exc
    return {spec.name: _conform(array, spec)}


def encode_outputs(outputs: dict[str, np.ndarray], wanted: list[str] | None) -> list[dict[str, Any]]:
    names = wanted if wanted is not None else list(outputs)
    result = []
    for name in names:
        if name not in outputs:
            raise InvalidInput(f"unknown output {name!r}; the model produces: {', '.join(outputs)}")
        array = np.asarray(outputs[name])
        datatype = NUMPY_TO_OIP.get(str(array.dtype), "BYTES")
        data = array.reshape(-1)
        result.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": datatype,
                "data": data.astype(str) if datatype == "BYTES" else data,
            }
        )
    return result


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
