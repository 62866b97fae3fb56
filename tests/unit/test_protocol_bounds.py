"""Shapes and outputs a client can abuse are refused with a 400 by every codec: v1, v2 JSON, binary, gRPC."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from serving.errors import InvalidRequest
from serving.protocol import grpc as grpc_codec
from serving.protocol import rest


def v2_json(shape: list[int]) -> Any:
    return rest.decode_v2(
        {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}, model="m"
    )


def v2_binary(shape: list[int]) -> Any:
    tensor = {"name": "x", "shape": shape, "datatype": "FP32", "parameters": {"binary_data_size": 0}}
    head = orjson.dumps({"inputs": [tensor]})
    payload, tail = rest.split_body(head, 1 << 20, str(len(head)))
    return rest.decode_v2(payload, tail, model="m")


def grpc_raw(shape: list[int]) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=shape)
    return grpc_codec.decode_infer(
        pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[b""])
    )


def grpc_typed(shape: list[int]) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=shape, contents=pb.InferTensorContents(fp32_contents=[])
    )
    return grpc_codec.decode_infer(pb.ModelInferRequest(model_name="m", inputs=[tensor]))


def v1_nested(depth: int) -> Any:
    instances: Any = [1.0]
    for _ in range(depth - 1):
        instances = [instances]
    return rest.decode_v1({"instances": instances}, model="m")


CODECS: dict[str, Callable[[list[int]], Any]] = {
    "v2 JSON": v2_json,
    "v2 binary": v2_binary,
    "gRPC raw": grpc_raw,
    "gRPC contents": grpc_typed,
}
SHAPES = {
    "rank 33": [1] * 33,
    "rank 64": [1] * 64,
    "zero beside 2**70": [0, 2**62, 2**62],
    "product past 2**48": [2**30, 2**30],
    "one huge dimension": [2**63 - 1],
}


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_shape_past_the_limits_is_a_400_on_every_codec(codec: str, shape: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        CODECS[codec](SHAPES[shape])
    assert refused.value.status_code == 400


def test_v1_instances_nested_past_the_rank_limit_are_a_400() -> None:
    v1_nested(32)
    with pytest.raises(InvalidRequest) as refused:
        v1_nested(33)
    assert refused.value.status_code == 400


def test_an_output_named_twice_is_a_400_on_json_and_grpc() -> None:
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    with pytest.raises(InvalidRequest, match="more than once"):
        rest.decode_v2({"inputs": [tensor], "outputs": [{"name": "y"}, {"name": "y"}]}, model="m")
    grpc_tensor = pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1.0])
    )
    out = pb.ModelInferRequest.InferRequestedOutputTensor(name="y")
    with pytest.raises(InvalidRequest, match="more than once"):
        grpc_codec.decode_infer(
            pb.ModelInferRequest(model_name="m", inputs=[grpc_tensor], outputs=[out, out])
        )
