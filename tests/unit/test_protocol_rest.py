"""The OIP v2 / v1 codec and the router, without Ray or HTTP."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from codec_helpers import infer_reply, parse_v1, parse_v2

from serving.errors import (
    InvalidInput,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    VersionNotFound,
)
from serving.formats.base import OIP_TO_NUMPY
from serving.manifest import TensorSpec
from serving.protocol import rest
from serving.protocol.tensors import datatype_of
from serving.server.rest import match

IRIS = [TensorSpec(name="input-0", datatype="FP32", shape=[-1, 4])]


def v2(**tensor: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    base.update(tensor)
    return {"inputs": [base]}


def test_flattened_row_major_data_is_reshaped() -> None:
    req = parse_v2(v2(shape=[2, 4], data=[1, 2, 3, 4, 5, 6, 7, 8]), IRIS)
    assert req.inputs["input-0"].shape == (2, 4)
    assert req.inputs["input-0"][1, 0] == 5
    assert req.inputs["input-0"].dtype == np.float32


def test_nested_data_is_accepted_too() -> None:
    req = parse_v2(v2(data=[[1, 2, 3, 4]]), IRIS)
    assert req.inputs["input-0"].tolist() == [[1, 2, 3, 4]]


def test_numeric_datatypes_are_cast_to_the_models() -> None:
    req = parse_v2(v2(datatype="FP64"), IRIS)
    assert req.inputs["input-0"].dtype == np.float32


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ([], "JSON object"),
        ({"inputs": []}, "non-empty"),
        (v2(shape=[1, 3], data=[1, 2, 3]), "does not match the model"),
        (v2(shape=[1, 5], data=[1, 2, 3, 4, 5]), "does not match the model"),
        (v2(data=[1, 2, 3]), "fill shape"),
        (v2(datatype="BYTES", data=["a", "b", "c", "d"]), "datatype"),
        (v2(datatype="FP99"), "unknown datatype"),
        (v2(data=["x", "y", "z", "w"]), "does not match datatype"),
        (v2(shape=[-1, 4]), "non-negative"),
        ({"inputs": [{"name": "input-0"}]}, "missing 'shape'"),
        ({**v2(), "outputs": ["predict"]}, "'outputs'"),
    ],
)
def test_malformed_requests_are_invalid_input(payload: object, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        parse_v2(payload, IRIS)


def test_unknown_input_name_for_a_multi_input_model_is_refused() -> None:
    specs = [
        TensorSpec(name="a", datatype="FP32", shape=[-1]),
        TensorSpec(name="b", datatype="FP32", shape=[-1]),
    ]
    with pytest.raises(InvalidInput, match="unknown input 'c'"):
        parse_v2({"inputs": [{"name": "c", "shape": [1], "datatype": "FP32", "data": [1]}]}, specs)


def test_body_over_the_limit_is_413_and_bad_json_is_400() -> None:
    with pytest.raises(PayloadTooLarge) as too_big:
        rest.parse_json(b"x" * 11, limit=10)
    assert too_big.value.status_code == 413
    with pytest.raises(InvalidInput, match="malformed JSON"):
        rest.parse_json(b"{nope", limit=100)


def test_outputs_are_flattened_with_shape_and_datatype() -> None:
    req = parse_v2(v2(), IRIS)
    body = orjson.loads(infer_reply("m", "1", req, {"p": np.array([[0.5, 0.5]]), "c": np.array([1])}).body)
    assert body["outputs"][0] == {"name": "p", "shape": [1, 2], "datatype": "FP64", "data": [0.5, 0.5]}
    assert body["outputs"][1]["datatype"] == "INT64"


def test_requested_outputs_are_filtered_and_unknown_ones_refused() -> None:
    outputs = {"p": np.array([1.0]), "c": np.array([1])}
    req = parse_v2({**v2(), "outputs": [{"name": "c"}]}, IRIS)
    assert [o["name"] for o in orjson.loads(infer_reply("m", "1", req, outputs).body)["outputs"]] == ["c"]
    with pytest.raises(InvalidInput, match="unknown output 'z'"):
        infer_reply("m", "1", parse_v2({**v2(), "outputs": [{"name": "z"}]}, IRIS), outputs)


def test_an_output_asked_for_twice_is_refused() -> None:
    """One tensor per name: a request cannot multiply its reply by repeating an output."""
    with pytest.raises(InvalidInput, match="more than once"):
        parse_v2({**v2(), "outputs": [{"name": "c"}] * 3}, IRIS)


@pytest.mark.parametrize(
    ("shape", "needle"),
    [([1] * 33, "rank 33"), ([0, 2**70], "elements"), ([2**40, 2**40], "elements")],
)
def test_shapes_past_the_limits_are_invalid_input_not_500(shape: list[int], needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        parse_v2(v2(shape=shape, data=[]), IRIS)


@pytest.mark.parametrize("name", ["iris/versions/7", "../x", "a b", ""])
def test_a_model_name_that_is_not_a_plain_name_is_a_400(name: str) -> None:
    from serving.protocol import rest as codec

    with pytest.raises(InvalidRequest) as refused:
        codec.decode_v2(v2(), model=name)
    assert refused.value.status_code == 400


def test_v1_instances_become_the_single_input() -> None:
    inputs = parse_v1({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}, IRIS)
    assert inputs["input-0"].shape == (2, 4)
    with pytest.raises(InvalidInput, match="instances"):
        parse_v1({"instances": "x"}, IRIS)
    with pytest.raises(InvalidInput, match="one shape"):
        parse_v1({"instances": [[1, 2], [3]]}, IRIS)


def test_errors_map_to_their_status_and_unknown_ones_to_500_without_details() -> None:
    assert rest.error_reply(VersionNotFound("no v9")).status == 404
    assert orjson.loads(rest.error_reply(VersionNotFound("no v9")).body) == {"error": "no v9"}
    internal = rest.error_reply(RuntimeError("secret path /etc/x"))
    assert internal.status == 500
    assert b"/etc/x" not in internal.body


@pytest.mark.parametrize(
    ("method", "path", "route", "params"),
    [
        ("GET", "/v2/health/ready", "ready", {}),
        ("GET", "/v2", "server_metadata", {}),
        ("POST", "/v2/models/iris/infer", "infer", {"model": "iris"}),
        ("POST", "/v2/models/iris/versions/7/infer", "infer", {"model": "iris", "version": "7"}),
        ("GET", "/v2/models/iris/versions/7/ready", "model_ready", {"model": "iris", "version": "7"}),
        ("POST", "/v1/models/iris:predict", "predict_v1", {"model": "iris"}),
        ("POST", "/v2/repository/models/iris/load", "load", {"model": "iris"}),
        ("GET", "/v2/repository/index/", "repository_index", {}),
    ],
)
def test_routes(method: str, path: str, route: str, params: dict[str, str]) -> None:
    assert match(method, path) == (route, params)


def test_unknown_paths_are_404_and_wrong_methods_405() -> None:
    with pytest.raises(NotFound):
        match("GET", "/v3/anything")
    with pytest.raises(MethodNotAllowed) as exc:
        match("GET", "/v2/models/iris/infer")
    assert exc.value.status_code == 405


def test_unexpected_errors_are_logged_once_with_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A non-ServingError is logged with its traceback; a client's mistake is not logged at all."""

    def boom() -> None:
        raise KeyError("internal detail")

    try:
        boom()
    except KeyError as exc:
        with caplog.at_level("ERROR", logger="serving.protocol.types"):
            reply = rest.error_reply(exc)
            rest.error_reply(InvalidInput("bad shape"))
    assert reply.status == 500
    assert b"internal detail" not in reply.body
    records = [r for r in caplog.records if r.name == "serving.protocol.types"]
    assert len(records) == 1
    assert records[0].exc_info is not None
    assert "in boom" in caplog.text


class _Failing:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "client"),
    [
        (FileNotFoundError(2, "No such file or directory"), True),
        (IsADirectoryError(21, "Is a directory"), True),
        (OSError(36, "File name too long"), True),
        (OSError(28, "No space left on device"), False),
    ],
)
def test_predictor_oserrors_caused_by_the_request_are_4xx(exc: OSError, client: bool) -> None:
    """An OSError the request caused (no such path, a directory) is a 400; a server fault is not."""
    from types import SimpleNamespace

    from serving.runtime.service import ModelService

    live = SimpleNamespace(predictor=_Failing(exc))
    if client:
        with pytest.raises(InvalidInput, match="could not use the input"):
            ModelService.run(live, {})  # type: ignore[arg-type]
    else:
        with pytest.raises(OSError, match="No space"):
            ModelService.run(live, {})  # type: ignore[arg-type]


def test_an_overloaded_reply_is_503_with_retry_after() -> None:
    from serving.errors import Overloaded

    reply = rest.error_reply(Overloaded("busy loading another version", retry_after_s=2))
    assert (reply.status, reply.headers) == (503, {"Retry-After": "2"})
    from serving.errors import NotReady

    assert rest.error_reply(NotReady("no model")).headers == {}


def test_a_request_without_an_id_gets_a_fresh_uuid4_and_one_with_an_id_keeps_it() -> None:
    import uuid

    specs = [TensorSpec(name="x", datatype="FP32", shape=[-1, 1])]
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    ids = {parse_v2(body, specs).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert parse_v2({**body, "id": "r-7"}, specs).id == "r-7"


@pytest.mark.parametrize("datatype", sorted(OIP_TO_NUMPY))
def test_every_datatype_is_named_by_its_dtype(datatype: str) -> None:
    assert datatype_of(np.zeros(2, dtype=OIP_TO_NUMPY[datatype])) == datatype
    assert datatype_of(np.zeros(2, dtype=np.dtype(OIP_TO_NUMPY[datatype]).str)) == datatype
    assert datatype_of(np.array(["a"], dtype=object)) == "BYTES"
    assert datatype_of(np.array(["a"])) == "BYTES"


def test_a_route_match_is_the_callers_to_change() -> None:
    name, params = match("POST", "/v2/models/iris/versions/7/infer")
    assert (name, params) == ("infer", {"model": "iris", "version": "7"})
    params["model"] = "changed"
    assert match("POST", "/v2/models/iris/versions/7/infer")[1] == {"model": "iris", "version": "7"}
    long = "/v2/models/" + "a" * 300 + "/infer"
    assert match("POST", long) == ("infer", {"model": "a" * 300})
    with pytest.raises(MethodNotAllowed):
        match("GET", "/v2/models/iris/infer")
    with pytest.raises(NotFound):
        match("GET", "/v3/nothing")
