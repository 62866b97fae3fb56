"""OIP over gRPC on every transport, checked against REST on the same server.

Clients are unmodified: ``tritonclient.grpc`` (its ``InferenceServerClient`` and
its generated stub for hand-built requests with typed ``contents``) and KServe's
``InferenceGRPCClient``, which runs in its own virtual environment
(``.cache/kserve-venv``, built by ``make test``) because kserve pins versions of
protobuf and pandas that the serving environment does not use. See conftest.py
for the servers and the store.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from .conftest import ADMIN_TOKEN, BOOM_VALUE, MAX_BODY, ROW, Served, wait_for

REPO_ROOT = Path(__file__).resolve().parents[3]
IRIS_ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 2.8, 4.3, 1.3]])


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(served.grpc) as c:
        yield c


@pytest.fixture
def stub(served: Served) -> Iterator[Any]:
    with grpc.insecure_channel(served.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def rows(n: int) -> np.ndarray:
    """``n`` iris-like rows (the three above, repeated)."""
    return np.resize(IRIS_ROWS, (n, 4))


def rest_infer(served: Served, model: str, data: np.ndarray, version: str = "") -> httpx.Response:
    path = f"/v2/models/{model}/versions/{version}/infer" if version else f"/v2/models/{model}/infer"
    datatype = "INT64" if data.dtype.kind == "i" else "FP64"
    body = {"inputs": [{"name": "input-0", "shape": list(data.shape), "datatype": datatype, "data": data}]}
    return httpx.post(
        served.base + path, content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), timeout=30
    )


def rest_outputs(reply: httpx.Response) -> dict[str, np.ndarray]:
    assert reply.status_code == 200, reply.text
    return {
        o["name"]: np.asarray(o["data"]).reshape(o["shape"])
        for o in reply.json()["outputs"]
        if o["name"] in ("predict", "predict_proba")
    }


def raw_input(data: np.ndarray, datatype: str = "FP64") -> triton.InferInput:
    tensor = triton.InferInput("input-0", list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def typed_request(model: str, data: np.ndarray, datatype: str = "FP64", **fields: Any) -> Any:
    """A hand-built ModelInferRequest carrying its values in ``contents``, not raw bytes."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="input-0", datatype=datatype, shape=list(data.shape))
    values = data.reshape(-1).tolist()
    if datatype == "INT64":
        tensor.contents.int64_contents.extend(values)
    else:
        tensor.contents.fp64_contents.extend(values)
    return request


def decoded(response: Any) -> dict[str, np.ndarray]:
    """A ModelInferResponse's outputs from ``raw_output_contents``."""
    dtypes = {"INT64": "<i8", "FP64": "<f8"}
    return {
        out.name: np.frombuffer(raw, dtype=dtypes[out.datatype]).reshape(list(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        if out.name in ("predict", "predict_proba")
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].shape == array.shape, name
        # NOTE: the same model on the same float64 input: the same bits, whatever the transport.
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def grpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- health and metadata ------------------------------------------------------------------------
def test_health_and_metadata_say_what_rest_says(served: Served, client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    rest = httpx.get(served.base + "/v2", timeout=10).json()
    meta = client.get_server_metadata()
    assert (meta.name, meta.version, list(meta.extensions)) == (
        rest["name"],
        rest["version"],
        rest["extensions"],
    )
    for path, version in (("/v2/models/iris", ""), ("/v2/models/iris/versions/2", "2")):
        rest = httpx.get(served.base + path, timeout=20).json()
        model = client.get_model_metadata("iris", version, as_json=True)
        assert (model["name"], model["versions"], model["platform"]) == (
            rest["name"],
            rest["versions"],
            rest["platform"],
        )
        for key in ("inputs", "outputs"):
            got = [{**t, "shape": [int(d) for d in t["shape"]]} for t in model[key]]
            assert got == rest[key]
    # NOTE: tritonclient answers False for an error too; the raw stub shows the code and message.
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        error = grpc_error(lambda: stub.ModelReady(pb.ModelReadyRequest(name="nope")))
    rest = httpx.get(served.base + "/v2/models/nope/ready", timeout=10)
    assert rest.status_code == 404
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, rest.json()["error"])


def test_repository_index_lists_what_rest_lists(served: Served, client: triton.InferenceServerClient) -> None:
    rest = {e["name"]: e for e in httpx.get(served.base + "/v2/repository/index", timeout=20).json()}
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert set(index) == set(rest)
    for name, entry in rest.items():
        assert (index[name]["version"], index[name]["state"]) == (entry["version"], entry["state"])


# -- infer --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 10_000])
def test_raw_tensors_predict_what_rest_does(
    served: Served, client: triton.InferenceServerClient, n: int
) -> None:
    """``raw_input_contents`` in, ``raw_output_contents`` out, the same numbers as REST's JSON."""
    data = rows(n)
    result = client.infer("iris", [raw_input(data)], request_id="grpc-raw")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("iris", "1", "grpc-raw")
    assert list(response.raw_output_contents)  # outputs come back as raw bytes, not contents
    got = {name: result.as_numpy(name) for name in ("predict", "predict_proba")}
    assert_same(got, rest_outputs(rest_infer(served, "iris", data)))


def test_typed_contents_predict_what_raw_tensors_do(served: Served, stub: Any) -> None:
    """Values in ``contents.fp64_contents`` / ``int64_contents``, and an explicit version."""
    data = rows(3)
    response = stub.ModelInfer(typed_request("iris", data, model_version="2"))
    assert response.model_version == "2"
    assert_same(decoded(response), rest_outputs(rest_infer(served, "iris", data, version="2")))
    ints = np.round(data).astype(np.int64)
    response = stub.ModelInfer(typed_request("ints", ints, "INT64"))
    assert_same(decoded(response), rest_outputs(rest_infer(served, "ints", ints)))


def test_only_the_requested_outputs_come_back(client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("predict")]
    result = client.infer("iris", [raw_input(rows(2))], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["predict"]
    assert result.as_numpy("predict").shape == (2,)


# -- errors -------------------------------------------------------------------------------------
def _v2(shape: list[int], data: Any, datatype: str = "FP64") -> bytes:
    return orjson.dumps({"inputs": [{"name": "input-0", "shape": shape, "datatype": datatype, "data": data}]})


ERRORS = [
    # (what, gRPC request, REST path, REST body, code)
    (
        "unknown model",
        typed_request("nope", np.array(ROW)),
        "/v2/models/nope/infer",
        _v2([1, 4], ROW),
        grpc.StatusCode.NOT_FOUND,
    ),
    (
        "unknown version",
        typed_request("iris", np.array(ROW), model_version="99"),
        "/v2/models/iris/versions/99/infer",
        _v2([1, 4], ROW),
        grpc.StatusCode.NOT_FOUND,
    ),
    (
        "wrong shape",
        typed_request("iris", np.array([[1.0, 2.0, 3.0]])),
        "/v2/models/iris/infer",
        _v2([1, 3], [[1.0, 2.0, 3.0]]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "too few values",
        pb.ModelInferRequest(
            model_name="iris",
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="input-0",
                    datatype="FP64",
                    shape=[1, 4],
                    contents=pb.InferTensorContents(fp64_contents=[1, 2, 3]),
                )
            ],
        ),
        "/v2/models/iris/infer",
        _v2([1, 4], [1, 2, 3]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "unknown datatype",
        pb.ModelInferRequest(
            model_name="iris",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP1024", shape=[1, 4])],
            raw_input_contents=[b"\0" * 32],
        ),
        "/v2/models/iris/infer",
        _v2([1, 4], ROW, "FP1024"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize(
    ("request_", "path", "body", "code"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS]
)
def test_errors_carry_rest_messages_with_a_grpc_code(
    served: Served, stub: Any, request_: Any, path: str, body: bytes, code: grpc.StatusCode
) -> None:
    rest = httpx.post(served.base + path, content=body, timeout=20)
    assert rest.status_code >= 400, rest.text
    error = grpc_error(lambda: stub.ModelInfer(request_))
    assert (error.code(), error.details()) == (code, rest.json()["error"])


def test_a_request_over_the_body_limit_is_resource_exhausted(
    client: triton.InferenceServerClient,
) -> None:
    data = rows(MAX_BODY // 32 + 1)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("iris", [raw_input(data)])
    assert caught.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert f"over the limit of {MAX_BODY}" in str(caught.value.message())
    # NOTE: still serving after refusing it.
    assert client.infer("iris", [raw_input(rows(1))]).as_numpy("predict").shape == (1,)


def test_load_needs_the_admin_token_as_rest_does(served: Served, stub: Any) -> None:
    request = pb.RepositoryModelLoadRequest(model_name="iris")
    url = served.base + "/v2/repository/models/iris/load"
    cases = [
        ((), {}, grpc.StatusCode.UNAUTHENTICATED),
        (
            (("authorization", "Bearer wrong"),),
            {"Authorization": "Bearer wrong"},
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    for metadata, headers, code in cases:
        rest = httpx.post(url, headers=headers, timeout=40)
        error = grpc_error(lambda metadata=metadata: stub.RepositoryModelLoad(request, metadata=metadata))
        assert (error.code(), error.details()) == (code, rest.json()["error"])
    stub.RepositoryModelLoad(request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=60)
    assert httpx.get(served.base + "/v2/models/iris/ready", timeout=10).json()["ready"] is True


# -- KServe's client ----------------------------------------------------------------------------
KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main(url, rows):
    client = InferenceGRPCClient(url, timeout=30)
    ready = await client.is_server_ready()
    model_ready = await client.is_model_ready("iris")
    data = np.array(rows, dtype=np.float64)
    tensor = InferInput("input-0", list(data.shape), "FP64")
    tensor.set_data_from_numpy(data, binary_data=False)
    result = await client.infer(InferRequest("iris", [tensor], request_id="kserve"))
    outputs = {o.name: o.as_numpy().tolist() for o in result.outputs}
    try:
        await client.infer(InferRequest("nope", [tensor]))
        error = None
    except Exception as exc:
        error = [str(exc.code()), exc.details()]
    await client.close()
    print(json.dumps({"ready": ready, "model_ready": model_ready, "id": result.id,
                      "version": result.model_version, "outputs": outputs, "error": error}))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def _kserve_python() -> str | None:
    explicit = os.environ.get("SERVING_TEST_KSERVE_PYTHON")
    if explicit:
        return explicit
    venv = REPO_ROOT / ".cache" / "kserve-venv" / "bin" / "python"
    return str(venv) if venv.is_file() else None


def test_kserve_grpc_client_predicts_what_rest_does(served: Served) -> None:
    python = _kserve_python()
    if python is None:
        reason = "no kserve: run `make test` (builds .cache/kserve-venv) or set SERVING_TEST_KSERVE_PYTHON"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: required)")
        pytest.skip(reason)
    data = rows(3)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [python, "-c", KSERVE_SCRIPT, served.grpc, json.dumps(data.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert (doc["ready"], doc["model_ready"], doc["id"], doc["version"]) == (True, True, "kserve", "1")
    got = {k: np.asarray(v) for k, v in doc["outputs"].items() if k in ("predict", "predict_proba")}
    assert_same(got, rest_outputs(rest_infer(served, "iris", data)))
    rest = httpx.post(served.base + "/v2/models/nope/infer", content=_v2([1, 4], ROW), timeout=10)
    assert doc["error"] == [str(grpc.StatusCode.NOT_FOUND), rest.json()["error"]]


def test_the_unexpected_error_is_logged_once(served: Served, stub: Any) -> None:
    """A 500 through gRPC is logged once with its traceback, like REST's; the model keeps serving."""

    def logged() -> list[str]:
        lines: list[str] = []
        for path in served.logs():
            try:
                lines += [
                    ln for ln in path.read_text(errors="replace").splitlines() if served.boom_marker in ln
                ]
            except OSError:
                continue
        return lines

    before = len(logged())
    error = grpc_error(
        lambda: stub.ModelInfer(typed_request("boom", np.array([[BOOM_VALUE, 1.0, 1.0, 1.0]])))
    )
    # NOTE: REST's reply to it (test_conformance.py checks it) is {"error": "internal error: RuntimeError"}.
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "internal error: RuntimeError")
    (line,) = wait_for(lambda: logged()[before:], what="the error in the server's log")
    assert "Traceback" in line
    assert decoded(stub.ModelInfer(typed_request("boom", np.array(ROW))))["predict"].shape == (1,)
    assert len(logged()) == before + 1
