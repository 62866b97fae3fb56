"""The REST codec as a transport drives it, for the codec's unit tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.manifest import TensorSpec
from serving.protocol import rest
from serving.protocol.tensors import conform, select_outputs
from serving.protocol.types import InferRequest, InferResponse


def parse_v2(payload: Any, specs: list[TensorSpec], binary: bytes | memoryview = b"") -> InferRequest:
    """Decode a v2 request and conform it to ``specs``, as the data plane does under a lease."""
    req = rest.decode_v2(payload, binary, model="m")
    req.inputs = conform(req.inputs, specs)
    return req


def parse_v1(payload: Any, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    return conform(rest.decode_v1(payload, model="m").inputs, specs)


def decode(
    body: bytes, headers: dict[str, str], specs: list[TensorSpec], limit: int = 1 << 20
) -> InferRequest:
    """A body and its headers (any case, as the ASGI adapter lower-cases them) to a conformed request."""
    lowered = {k.lower(): v for k, v in headers.items()}
    payload, tail = rest.split_body(body, limit, lowered.get(rest.INFERENCE_HEADER.lower()))
    return parse_v2(payload, specs, tail)


def infer_reply(model: str, version: str, req: InferRequest, outputs: dict[str, np.ndarray]) -> rest.Reply:
    return rest.encode_v2(
        InferResponse(model, version, req.id, select_outputs(outputs, req.output_names)), req
    )
