"""The gRPC codec and servicer: protobuf straight to typed requests and back, no JSON step."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from serving import errors
from serving.errors import InvalidInput
from serving.formats.base import OIP_TO_NUMPY
from serving.manifest import TensorSpec
from serving.protocol.grpc import decode_infer, encode_infer, grpc_code
from serving.protocol.tensors import conform
from serving.protocol.types import InferRequest, InferResponse


def decode(request: pb.ModelInferRequest, specs: list[TensorSpec]) -> InferRequest:
    """The typed request the codec makes of a message, conformed as the data plane does."""
    if not request.model_name:
        request.model_name = "m"
    req = decode_infer(request)
    req.inputs = conform(req.inputs, specs)
    return req


def tensor(name: str, datatype: str, shape: list[int], **contents: list[object]) -> object:
    return pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape, contents=pb.InferTensorContents(**contents)
    )


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP64", "fp64_contents", [1.5, -2.25, 3.0, 4.125]),
        ("FP32", "fp32_contents", [1.5, -2.25, 3.0, 4.125]),
        ("INT64", "int64_contents", [2**40, -3, 0, 7]),
        ("INT32", "int_contents", [2**30, -3, 0, 7]),
        ("INT8", "int_contents", [127, -128, 0, 7]),
        ("UINT16", "uint_contents", [65535, 0, 1, 2]),
        ("UINT64", "uint64_contents", [2**63, 0, 1, 2]),
        ("BOOL", "bool_contents", [True, False, True, True]),
    ],
)
def test_typed_contents_decode_to_the_same_array(datatype: str, field: str, values: list[object]) -> None:
    request = pb.ModelInferRequest(model_name="m", inputs=[tensor("x", datatype, [2, 2], **{field: values})])
    spec = TensorSpec(name="x", datatype=datatype, shape=[-1, 2])
    got = decode(request, [spec]).inputs["x"]
    want = np.array(values, dtype=OIP_TO_NUMPY[datatype]).reshape(2, 2)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_bytes_contents_decode_to_bytes_elements() -> None:
    request = pb.ModelInferRequest(
        inputs=[tensor("s", "BYTES", [3], bytes_contents=[b"a", b"", "中".encode()])]
    )
    got = decode(request, [TensorSpec(name="s", datatype="BYTES", shape=[-1])]).inputs["s"]
    assert got.tolist() == [b"a", b"", "中".encode()]


def test_raw_contents_pass_through_in_input_order() -> None:
    a, b = np.arange(6, dtype="<f4").reshape(2, 3), np.array([9, 8], dtype="<i8")
    request = pb.ModelInferRequest(
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="a", datatype="FP32", shape=[2, 3]),
            pb.ModelInferRequest.InferInputTensor(name="b", datatype="INT64", shape=[2]),
        ],
        raw_input_contents=[a.tobytes(), b.tobytes()],
        id="req-1",
    )
    specs = [
        TensorSpec(name="a", datatype="FP32", shape=[-1, 3]),
        TensorSpec(name="b", datatype="INT64", shape=[-1]),
    ]
    decoded = decode(request, specs)
    np.testing.assert_array_equal(decoded.inputs["a"], a)
    np.testing.assert_array_equal(decoded.inputs["b"], b)
    assert decoded.id == "req-1"


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (
            pb.ModelInferRequest(
                inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP64", shape=[1])],
                raw_input_contents=[b"\0" * 8, b"\0" * 8],
            ),
            "2 raw_input_contents for 1 inputs",
        ),
        (
            pb.ModelInferRequest(inputs=[tensor("x", "FP64", [2], fp32_contents=[1.0, 2.0])]),
            "takes its values from contents.fp64_contents, not contents.fp32_contents",
        ),
        (
            pb.ModelInferRequest(inputs=[tensor("x", "INT8", [2], int_contents=[1, 300])]),
            "out of range for INT8",
        ),
        (
            pb.ModelInferRequest(inputs=[tensor("x", "FP16", [1])]),
            "send it in raw_input_contents",
        ),
        (
            pb.ModelInferRequest(inputs=[tensor("x", "FP64", [1, 4], fp64_contents=[1.0, 2.0, 3.0])]),
            "3 values do not fill shape [1, 4] (4 values)",
        ),
        (
            pb.ModelInferRequest(
                inputs=[tensor("x", "FP64", [1], fp64_contents=[1.0])], raw_input_contents=[b"\0" * 8]
            ),
            "both contents and raw_input_contents",
        ),
    ],
)
def test_contents_that_do_not_line_up_are_invalid_input(request_: pb.ModelInferRequest, needle: str) -> None:
    request_.model_name = "m"
    with pytest.raises(InvalidInput) as caught:
        decode_infer(request_)
    assert needle in str(caught.value)


def test_a_raw_size_that_does_not_match_the_shape_gets_the_codec_message() -> None:
    request = pb.ModelInferRequest(
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP64", shape=[2])],
        raw_input_contents=[b"\0" * 8],
    )
    with pytest.raises(InvalidInput, match="2 FP64 values take 16"):
        decode(request, [TensorSpec(name="x", datatype="FP64", shape=[-1])])


def test_outputs_become_raw_output_contents() -> None:
    outputs = {"p": np.array([[0.25, 0.75]]), "s": np.array([b"yes"], dtype=object)}
    response = encode_infer(InferResponse("m", "3", "id-7", outputs))
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "id-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("p", "FP64", [1, 2]),
        ("s", "BYTES", [1]),
    ]
    p, s = response.raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(p, "<f8"), [0.25, 0.75])
    assert s == b"\x03\x00\x00\x00yes"


def test_integer_outputs_are_packed_little_endian() -> None:
    response = encode_infer(InferResponse("m", "1", "id", {"y": np.array([1, 2], dtype=np.int64)}))
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), [1, 2])


@pytest.mark.parametrize(
    ("name", "version"), [("iris/versions/7", ""), ("iris", "7/../8"), ("", ""), (" iris", "")]
)
def test_a_name_or_version_that_is_not_a_plain_name_is_invalid_argument(name: str, version: str) -> None:
    request = pb.ModelInferRequest(
        model_name=name, model_version=version, inputs=[tensor("x", "FP64", [1], fp64_contents=[1.0])]
    )
    with pytest.raises(errors.InvalidRequest) as refused:
        decode_infer(request)
    assert grpc_code(refused.value.status_code) == grpc.StatusCode.INVALID_ARGUMENT


def test_an_output_asked_for_twice_is_invalid_argument() -> None:
    request = pb.ModelInferRequest(
        model_name="m",
        inputs=[tensor("x", "FP64", [1], fp64_contents=[1.0])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")] * 2,
    )
    with pytest.raises(InvalidInput, match="more than once"):
        decode_infer(request)


def test_every_error_status_has_a_grpc_code() -> None:
    """Each error of the tree maps to the code its meaning calls for, never to OK or UNKNOWN."""
    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, errors.ServingError)]
    for cls in classes:
        assert grpc_code(cls.status_code) not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN), cls
    assert grpc_code(errors.InvalidInput.status_code) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(errors.ModelNotFound.status_code) == grpc.StatusCode.NOT_FOUND
    assert grpc_code(errors.NotReady.status_code) == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(errors.PayloadTooLarge.status_code) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_code(errors.RequestTimeout.status_code) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert grpc_code(errors.Unauthorized.status_code) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(errors.Forbidden.status_code) == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_code(errors.LoadError.status_code) == grpc.StatusCode.INTERNAL
    assert grpc_code(418) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(599) == grpc.StatusCode.INTERNAL


class _Busy:
    """A model port that is not ready and answers infer with Overloaded (a 503 with Retry-After)."""

    async def infer(self, request: InferRequest) -> InferResponse:
        raise errors.Overloaded("model 'm' is loading too many versions", retry_after_s=2)

    async def metadata(self, version: str | None) -> object:
        raise AssertionError("not called")

    async def refused(self, version: str | None, status: int) -> None:
        raise AssertionError("not called")

    async def ready(self, version: str | None) -> bool:
        return False

    async def status(self) -> dict[str, object]:
        return {}


def test_not_ready_is_an_answer_and_a_busy_model_says_when_to_retry() -> None:
    """Over a real grpc.aio server on loopback: ready=false with OK; Overloaded is UNAVAILABLE
    with REST's message and ``retry-after`` in the trailing metadata."""
    from serving.config import AppConfig
    from serving.dataplane import DataPlane
    from serving.server.grpc import start_server
    from serving.testing import free_port

    async def scenario() -> tuple[bool, bool, grpc.StatusCode, str, dict[str, str]]:
        config = AppConfig.model_validate({"models": [{"name": "m"}]})
        plane = DataPlane(config, {"m": _Busy()}, loads=None)  # type: ignore[arg-type]
        port = free_port()
        server = await start_server(plane, "127.0.0.1", port)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                ready = channel.unary_unary(
                    "/inference.GRPCInferenceService/ServerReady",
                    request_serializer=pb.ServerReadyRequest.SerializeToString,
                    response_deserializer=pb.ServerReadyResponse.FromString,
                )
                model_ready = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelReady",
                    request_serializer=pb.ModelReadyRequest.SerializeToString,
                    response_deserializer=pb.ModelReadyResponse.FromString,
                )
                infer = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                server_ready = (await ready(pb.ServerReadyRequest())).ready
                m_ready = (await model_ready(pb.ModelReadyRequest(name="m"))).ready
                call = infer(
                    pb.ModelInferRequest(
                        model_name="m", inputs=[tensor("x", "FP64", [1], fp64_contents=[1.0])]
                    )
                )
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    trailing = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
                    return server_ready, m_ready, exc.code(), exc.details() or "", trailing
                raise AssertionError("ModelInfer on a busy model succeeded")
        finally:
            await server.stop(None)

    server_ready, model_ready, code, details, trailing = asyncio.run(scenario())
    assert (server_ready, model_ready) == (False, False)
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "model 'm' is loading too many versions")
    assert trailing["retry-after"] == "2"
