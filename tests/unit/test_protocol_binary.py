"""The OIP binary tensor data extension in the v2 codec, without Ray or HTTP."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest
from codec_helpers import decode as codec_decode
from codec_helpers import infer_reply, parse_v2

from serving.errors import InvalidInput, PayloadTooLarge
from serving.formats.base import OIP_TO_NUMPY
from serving.manifest import TensorSpec
from serving.protocol import rest
from serving.protocol.types import InferRequest

HEADER = rest.INFERENCE_HEADER
IRIS = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]])


def binary_request(
    tensors: list[tuple[dict[str, Any], bytes | None]], **extra: Any
) -> tuple[bytes, dict[str, str]]:
    """A body and headers as a client builds them: JSON header, then each binary input's bytes."""
    inputs = []
    tail = b""
    for meta, raw in tensors:
        if raw is not None:
            meta = {**meta, "parameters": {"binary_data_size": len(raw)}}
            tail += raw
        inputs.append(meta)
    head = orjson.dumps({"inputs": inputs, **extra})
    return head + tail, {HEADER: str(len(head))}


def iris_request(rows: np.ndarray = ROWS, **extra: Any) -> tuple[bytes, dict[str, str]]:
    meta = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64"}
    return binary_request([(meta, rows.astype("<f8").tobytes())], **extra)


def decode(body: bytes, headers: dict[str, str], specs: list[TensorSpec] = IRIS) -> InferRequest:
    return codec_decode(body, headers, specs)


def split_reply(reply: rest.Reply) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The reply's JSON header and its binary outputs decoded by hand, per the spec."""
    size = int(reply.headers[HEADER])
    head = orjson.loads(reply.body[:size])
    offset = size
    arrays = {}
    for out in head["outputs"]:
        k = out.get("parameters", {}).get("binary_data_size")
        if k is None:
            continue
        dtype = np.dtype(OIP_TO_NUMPY[out["datatype"]]).newbyteorder("<")
        arrays[out["name"]] = np.frombuffer(reply.body[offset : offset + k], dtype).reshape(out["shape"])
        offset += k
    assert offset == len(reply.body)
    return head, arrays


# -- requests ------------------------------------------------------------------------
def test_binary_input_decodes_to_a_writable_copy_of_the_same_array() -> None:
    body, headers = iris_request()
    got = decode(body, headers).inputs["input-0"]
    assert got.dtype == np.float64
    assert np.array_equal(got, ROWS)
    assert got.flags.writeable
    assert not np.shares_memory(got, np.frombuffer(body, np.uint8))


NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]


@pytest.mark.parametrize("datatype", [*NUMERIC, "FP16", "FP32", "FP64"])
def test_every_numeric_datatype_round_trips_little_endian(datatype: str) -> None:
    dtype = np.dtype(OIP_TO_NUMPY[datatype])
    values = (np.arange(6) % 2 if datatype == "BOOL" else np.arange(6) * 3).astype(dtype).reshape(2, 3)
    raw = values.astype(dtype.newbyteorder("<")).tobytes()
    body, headers = binary_request([({"name": "x", "shape": [2, 3], "datatype": datatype}, raw)])
    req = decode(body, headers, [TensorSpec(name="x", datatype=datatype, shape=[-1, 3])])
    assert req.inputs["x"].dtype == dtype
    assert np.array_equal(req.inputs["x"], values)


def test_bytes_input_is_length_prefixed_elements() -> None:
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"hi", b"", b"\xff\x00"))
    body, headers = binary_request([({"name": "s", "shape": [3], "datatype": "BYTES"}, raw)])
    req = decode(body, headers, [TensorSpec(name="s", datatype="BYTES", shape=[-1])])
    assert req.inputs["s"].tolist() == [b"hi", b"", b"\xff\x00"]


def test_json_and_binary_inputs_mix_and_binary_blocks_follow_input_order() -> None:
    specs = [
        TensorSpec(name="a", datatype="INT32", shape=[-1]),
        TensorSpec(name="b", datatype="FP32", shape=[-1]),
        TensorSpec(name="c", datatype="INT32", shape=[-1]),
    ]
    body, headers = binary_request(
        [
            ({"name": "a", "shape": [2], "datatype": "INT32"}, np.array([1, 2], "<i4").tobytes()),
            ({"name": "b", "shape": [1], "datatype": "FP32", "data": [0.5]}, None),
            ({"name": "c", "shape": [3], "datatype": "INT32"}, np.array([7, 8, 9], "<i4").tobytes()),
        ]
    )
    req = decode(body, headers, specs)
    assert req.inputs["a"].tolist() == [1, 2]
    assert req.inputs["b"].tolist() == [0.5]
    assert req.inputs["c"].tolist() == [7, 8, 9]


def test_header_name_matches_ignoring_case() -> None:
    body, headers = iris_request()
    req = decode(body, {HEADER.lower(): headers[HEADER], "content-type": "application/octet-stream"})
    assert np.array_equal(req.inputs["input-0"], ROWS)


def test_a_header_length_equal_to_the_body_is_a_plain_json_request() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}
    )
    req = decode(body, {HEADER: str(len(body))})
    assert req.inputs["input-0"].tolist() == [[1, 2, 3, 4]]


def test_the_size_limit_applies_to_the_whole_body_binary_part_included() -> None:
    body, headers = iris_request(np.zeros((200, 4)))
    with pytest.raises(PayloadTooLarge):
        codec_decode(body, headers, IRIS, limit=len(body) - 1)


def _with_size(size: Any) -> tuple[bytes, dict[str, str]]:
    raw = ROWS.astype("<f8").tobytes()
    meta = {"name": "input-0", "shape": [2, 4], "datatype": "FP64", "parameters": {"binary_data_size": size}}
    head = orjson.dumps({"inputs": [meta]})
    return head + raw, {HEADER: str(len(head))}


def _no_size() -> tuple[bytes, dict[str, str]]:
    head = orjson.dumps({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64"}]})
    return head + ROWS.tobytes(), {HEADER: str(len(head))}


def _both_data_and_size() -> tuple[bytes, dict[str, str]]:
    meta = {
        "name": "input-0",
        "shape": [1, 4],
        "datatype": "FP64",
        "data": [1, 2, 3, 4],
        "parameters": {"binary_data_size": 32},
    }
    head = orjson.dumps({"inputs": [meta]})
    return head + np.zeros(4).tobytes(), {HEADER: str(len(head))}


def _header(value: str) -> tuple[bytes, dict[str, str]]:
    body, _ = iris_request()
    return body, {HEADER: value}


def _size_without_header() -> tuple[bytes, dict[str, str]]:
    body, headers = _with_size(64)
    return body[: int(headers[HEADER])], {}


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        pytest.param(_header("100000"), "but the request body is only", id="header-longer-than-body"),
        pytest.param(_header("-3"), "non-negative integer", id="header-negative"),
        pytest.param(_header("twelve"), "non-negative integer", id="header-not-a-number"),
        pytest.param(_header("\u00b2"), "non-negative integer", id="header-a-unicode-digit"),
        pytest.param(_header("5"), "malformed JSON", id="header-cuts-the-json"),
        pytest.param(_with_size(63), "take 64", id="size-below-shape-times-itemsize"),
        pytest.param(_with_size(32), "left after the JSON header|take 64", id="size-leaves-bytes-over"),
        pytest.param(_with_size(65), "runs past the binary data", id="size-past-the-end"),
        pytest.param(_with_size("64"), "non-negative integer", id="size-not-an-integer"),
        pytest.param(_with_size(True), "non-negative integer", id="size-a-boolean"),
        pytest.param(_no_size(), "neither 'data' nor parameters.binary_data_size", id="size-missing"),
        pytest.param(_both_data_and_size(), "both 'data' and", id="data-and-size"),
        pytest.param(_size_without_header(), HEADER, id="size-without-the-header"),
        pytest.param(
            iris_request(parameters={"binary_data_output": "yes"}), "true or false", id="flag-not-a-bool"
        ),
    ],
)
def test_malformed_binary_requests_are_invalid_input(
    request_: tuple[bytes, dict[str, str]], needle: str
) -> None:
    with pytest.raises(InvalidInput, match=needle) as caught:
        decode(*request_)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (struct.pack("<I", 10) + b"abc", "runs past its data"),
        (struct.pack("<I", 1) + b"a" + b"\x00\x00", "inside an element's 4-byte length"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", "do not fill its shape"),
    ],
)
def test_malformed_bytes_tensors_are_invalid_input(raw: bytes, needle: str) -> None:
    body, headers = binary_request([({"name": "s", "shape": [1], "datatype": "BYTES"}, raw)])
    with pytest.raises(InvalidInput, match=needle):
        decode(body, headers, [TensorSpec(name="s", datatype="BYTES", shape=[-1])])


def test_binary_bytes_not_claimed_by_any_input_are_refused() -> None:
    body, headers = iris_request()
    with pytest.raises(InvalidInput, match="add up to 64"):
        decode(body + b"\x00" * 8, headers)


# -- replies -------------------------------------------------------------------------------
OUTPUTS = {"predict": np.array([0, 2]), "predict_proba": np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])}


def reply_for(**extra: Any) -> rest.Reply:
    req = decode(*iris_request(**extra))
    return infer_reply("iris", "3", req, OUTPUTS)


def test_a_request_that_asks_for_nothing_binary_gets_plain_json() -> None:
    reply = reply_for()
    assert reply.content_type == rest.JSON
    assert reply.headers == {}
    outputs = {o["name"]: o for o in orjson.loads(reply.body)["outputs"]}
    assert outputs["predict"]["data"] == [0, 2]


def test_binary_data_output_returns_every_output_as_binary() -> None:
    reply = reply_for(parameters={"binary_data_output": True}, id="r1")
    assert reply.content_type == rest.OCTET_STREAM
    head, arrays = split_reply(reply)
    assert (head["model_name"], head["model_version"], head["id"]) == ("iris", "3", "r1")
    assert all("data" not in o for o in head["outputs"])
    assert np.array_equal(arrays["predict"], OUTPUTS["predict"])
    assert np.array_equal(arrays["predict_proba"], OUTPUTS["predict_proba"])


def test_per_output_binary_data_overrides_the_request_default() -> None:
    reply = reply_for(
        parameters={"binary_data_output": True},
        outputs=[{"name": "predict_proba"}, {"name": "predict", "parameters": {"binary_data": False}}],
    )
    head, arrays = split_reply(reply)
    assert [o["name"] for o in head["outputs"]] == ["predict_proba", "predict"]
    assert list(arrays) == ["predict_proba"]
    assert head["outputs"][1]["data"] == [0, 2]


def test_bytes_outputs_are_length_prefixed_in_binary() -> None:
    req = decode(*iris_request(parameters={"binary_data_output": True}))
    reply = infer_reply("m", "1", req, {"label": np.array(["setosa", "ok"])})
    size = int(reply.headers[HEADER])
    head = orjson.loads(reply.body[:size])
    assert head["outputs"][0]["datatype"] == "BYTES"
    assert reply.body[size:] == struct.pack("<I", 6) + b"setosa" + struct.pack("<I", 2) + b"ok"


# -- the JSON path's fast numeric decoding keeps the general path's answers -------------------
@pytest.mark.parametrize(
    "data",
    [
        [[1, 2, 3, 4], [5, 6, 7, 8]],
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1.5, True, 3, 4, 5, 6, 7, 8],
    ],
)
def test_flat_and_nested_json_numbers_decode_alike(data: list[Any]) -> None:
    payload = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": data}]}
    got = parse_v2(payload, IRIS).inputs["input-0"]
    assert np.array_equal(got, np.asarray(data, dtype=np.float64).reshape(2, 4))


@pytest.mark.parametrize(
    "data",
    [
        [[1, 2, 3], [4, 5, 6, 7, 8]],  # ragged rows
        [[1, 2, 3, 4], "5678"],  # a string where a row belongs
        [1, 2, 3, 4, 5, 6, 7, [8]],
        ["a", 2, 3, 4, 5, 6, 7, 8],
    ],
)
def test_malformed_json_numbers_are_still_refused(data: list[Any]) -> None:
    payload = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": data}]}
    with pytest.raises(InvalidInput):
        parse_v2(payload, IRIS)


def test_out_of_range_integers_are_a_400_not_a_500() -> None:
    specs = [TensorSpec(name="x", datatype="UINT8", shape=[-1])]
    payload = {"inputs": [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, -1]}]}
    with pytest.raises(InvalidInput, match="does not match datatype"):
        parse_v2(payload, specs)


# -- a standard client: tritonclient's HTTP module ----------------------------------------
def test_tritonclient_requests_decode_and_our_replies_parse_in_tritonclient() -> None:
    """What tritonclient.http sends (binary inputs, binary outputs) we read, and it reads ours."""
    httpclient = pytest.importorskip("tritonclient.http")
    x = httpclient.InferInput("input-0", list(ROWS.shape), "FP64")
    x.set_data_from_numpy(ROWS, binary_data=True)
    words = httpclient.InferInput("words", [2], "BYTES")
    words.set_data_from_numpy(np.array([b"a", b"bcd"], dtype=object), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([x, words], request_id="t-1")
    specs = [*IRIS, TensorSpec(name="words", datatype="BYTES", shape=[-1])]
    req = decode(body, {HEADER: str(json_size)}, specs)
    assert np.array_equal(req.inputs["input-0"], ROWS)
    assert req.inputs["words"].tolist() == [b"a", b"bcd"]
    # NOTE: with no outputs named, tritonclient asks for binary_data_output.
    reply = infer_reply("iris", "1", req, OUTPUTS)
    assert reply.content_type == rest.OCTET_STREAM
    result = httpclient.InferenceServerClient.parse_response_body(
        reply.body, header_length=int(reply.headers[HEADER])
    )
    assert result.get_response()["id"] == "t-1"
    assert np.array_equal(result.as_numpy("predict"), OUTPUTS["predict"])
    assert np.array_equal(result.as_numpy("predict_proba"), OUTPUTS["predict_proba"])


def test_tritonclient_requested_outputs_choose_binary_per_output() -> None:
    httpclient = pytest.importorskip("tritonclient.http")
    x = httpclient.InferInput("input-0", list(ROWS.shape), "FP64")
    x.set_data_from_numpy(ROWS, binary_data=True)
    outputs = [
        httpclient.InferRequestedOutput("predict", binary_data=False),
        httpclient.InferRequestedOutput("predict_proba", binary_data=True),
    ]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([x], outputs=outputs)
    reply = infer_reply("iris", "1", decode(body, {HEADER: str(json_size)}), OUTPUTS)
    result = httpclient.InferenceServerClient.parse_response_body(
        reply.body, header_length=int(reply.headers[HEADER])
    )
    assert result.get_output("predict")["data"] == [0, 2]
    assert np.array_equal(result.as_numpy("predict_proba"), OUTPUTS["predict_proba"])
