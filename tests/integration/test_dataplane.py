"""One data plane under every transport: a real store, real sklearn versions, a real gRPC server, no Ray."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import joblib
import numpy as np
import orjson
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from tritonclient.grpc import service_pb2 as pb

from serving.config import AppConfig, ModelConfig
from serving.dataplane import DataPlane
from serving.formats.base import OIP_TO_NUMPY
from serving.protocol import rest as rest_codec
from serving.publish import publish_path
from serving.repository import Repository, SetTarget
from serving.runtime.service import ModelService
from serving.server.grpc import start_server
from serving.server.local import LocalModel
from serving.server.rest import HttpRequest, RestApi
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.testing import free_port

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])


def _publish(tmp_path: Path, repo: Repository, version: str, shuffle: bool) -> None:
    x, y = load_iris(return_X_y=True)
    if shuffle:
        # NOTE: a second version that answers differently, so a mixed answer shows.
        y = np.random.default_rng(0).permutation(y)
    path = tmp_path / f"iris-{version}.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(x, y), path)
    publish_path(repo, path, "iris", version=version, example=ROWS[:1].tolist())


@pytest.fixture
def store(tmp_path: Path) -> str:
    root = str(tmp_path / "store")
    repo = Repository(LocalStore(root))
    _publish(tmp_path, repo, "1", shuffle=False)
    _publish(tmp_path, repo, "2", shuffle=True)
    repo.move_alias("iris", "production", SetTarget("1"))
    return root


def _service(
    tmp_path: Path, store: str, app_args: dict[str, Any] | None = None, **model: Any
) -> ModelService:
    app = AppConfig(
        models=[ModelConfig(name="iris", alias="production", isolation="never", **model)], **(app_args or {})
    )
    service = ModelService(app.models[0], app, Settings(store=store, cache_dir=tmp_path / "cache"))
    service.start()
    return service


@pytest.fixture
def service(tmp_path: Path, store: str) -> Iterator[ModelService]:
    svc = _service(tmp_path, store)
    yield svc
    svc.close()


def _rest_infer(plane: DataPlane, payload: dict[str, Any]) -> dict[str, np.ndarray]:
    async def body() -> AsyncIterator[bytes]:
        yield orjson.dumps(payload)

    reply = asyncio.run(RestApi(plane).handle(HttpRequest("POST", "/v2/models/iris/infer", {}, body)))
    assert reply.status == 200, reply.body
    return {
        o["name"]: np.asarray(o["data"], dtype=OIP_TO_NUMPY[o["datatype"]]).reshape(o["shape"])
        for o in orjson.loads(reply.body)["outputs"]
    }


async def _grpc_call(plane: DataPlane, request: Any) -> tuple[Any, grpc.StatusCode, str]:
    """One ModelInfer over a real grpc.aio server on loopback: the response (or None), code, details."""
    port = free_port()
    server = await start_server(plane, "127.0.0.1", port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            try:
                return await infer(request), grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                return None, exc.code(), exc.details() or ""
    finally:
        await server.stop(None)


def _grpc_request(name: str = "iris") -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="input-0",
        datatype="FP64",
        shape=list(ROWS.shape),
        contents=pb.InferTensorContents(fp64_contents=ROWS.ravel()),
    )
    return pb.ModelInferRequest(model_name=name, inputs=[tensor])


def _arrays(response: Any) -> dict[str, np.ndarray]:
    return {
        o.name: np.frombuffer(raw, np.dtype(OIP_TO_NUMPY[o.datatype]).newbyteorder("<")).reshape(
            list(o.shape)
        )
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _plane(service: ModelService) -> DataPlane:
    return DataPlane(service.app, {"iris": LocalModel(service)}, loads=None)  # type: ignore[arg-type]


def test_grpc_and_rest_answer_the_same_request_with_identical_tensors(service: ModelService) -> None:
    plane = _plane(service)
    tensor = {"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}
    over_rest = _rest_infer(plane, {"inputs": [tensor]})
    response, code, details = asyncio.run(_grpc_call(plane, _grpc_request()))
    assert code == grpc.StatusCode.OK, details
    over_grpc = _arrays(response)
    assert list(over_grpc) == list(over_rest)
    for name, array in over_rest.items():
        assert over_grpc[name].dtype == array.dtype, name
        np.testing.assert_array_equal(over_grpc[name], array)


def test_grpc_infer_takes_no_json_step(service: ModelService, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the JSON codec broken, gRPC still answers: protobuf goes straight to arrays and back."""

    class NoJson:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"the gRPC path used the JSON codec (orjson.{name})")

    monkeypatch.setattr(rest_codec, "orjson", NoJson())
    for name in ("split_body", "parse_json", "decode_v2", "decode_v1", "encode_v2", "encode_v1"):
        monkeypatch.setattr(rest_codec, name, NoJson().__getattr__)
    response, code, details = asyncio.run(_grpc_call(_plane(service), _grpc_request()))
    assert code == grpc.StatusCode.OK, details
    assert response.model_version == "1"
    assert "predict" in _arrays(response)


def test_a_model_name_with_a_slash_is_invalid_argument_not_another_version(service: ModelService) -> None:
    _, code, details = asyncio.run(_grpc_call(_plane(service), _grpc_request("iris/versions/2")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid model name" in details


def test_the_batched_path_decodes_and_predicts_under_one_lease(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alias moves after a request was decoded and before its batch predicts: it is still
    answered whole by the version that decoded it, and a request decoded after the swap by the new one."""
    from types import SimpleNamespace

    from ray import serve

    from serving.server.ray.batching import BatchedModel

    # NOTE: @serve.batch reads its replica's max_ongoing_requests once, for a warning; this
    # runs the real batcher outside a replica (no Ray in this suite).
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=100))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)

    service = _service(
        tmp_path, store, batching={"enabled": True, "max_batch_size": 8, "batch_wait_timeout_s": 0.01}
    )
    port = BatchedModel(service)
    want = {v: service.slot.cache.resolve(service.slot.repo, f"iris:{v}")[0] for v in ("1", "2")}
    swapped = asyncio.Event()
    predict_group = port._predict_group

    async def after_swap(live: Any, items: Any) -> Any:
        await swapped.wait()
        return await predict_group(live, items)

    port._predict_group = after_swap  # type: ignore[method-assign]
    from serving.protocol.types import InferRequest

    def request() -> InferRequest:
        return InferRequest(model="iris", inputs={"input-0": ROWS.copy()}, outputs=None)

    async def scenario() -> tuple[Any, Any]:
        before = asyncio.ensure_future(port.infer(request()))
        # NOTE: poll until the request is decoded and waiting in its batch (it holds a lease).
        deadline = asyncio.get_running_loop().time() + 10
        while service.slot.live is not None and service.slot.live._leases == 0:
            assert asyncio.get_running_loop().time() < deadline, "the request never reached its batch"
            await asyncio.sleep(0.001)
        await asyncio.to_thread(service.slot.swap_to, want["2"], reason="test")
        after = asyncio.ensure_future(port.infer(request()))
        swapped.set()
        return await before, await after

    try:
        before, after = asyncio.run(scenario())
    finally:
        service.close()
    expected = {}
    for version in ("1", "2"):
        model = joblib.load(Path(service.slot.cache.root).parent / f"iris-{version}.joblib")
        expected[version] = model.predict_proba(ROWS)
    assert before.version == "1"
    np.testing.assert_allclose(before.outputs["predict_proba"], expected["1"])
    assert after.version == "2"
    np.testing.assert_allclose(after.outputs["predict_proba"], expected["2"])


def test_an_answer_over_the_reply_limit_is_refused_before_it_is_encoded(tmp_path: Path, store: str) -> None:
    """413 on REST, RESOURCE_EXHAUSTED on gRPC, naming the limit; a small answer still passes."""
    service = _service(tmp_path, store, app_args={"max_reply_bytes": 2048})
    plane = _plane(service)
    rows = np.repeat(ROWS, 40, axis=0)  # 120 rows: predict_proba alone holds 2,880 bytes

    async def body() -> AsyncIterator[bytes]:
        tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.tolist()}
        yield orjson.dumps({"inputs": [tensor]})

    try:
        reply = asyncio.run(RestApi(plane).handle(HttpRequest("POST", "/v2/models/iris/infer", {}, body)))
        assert reply.status == 413
        assert b"max_reply_bytes" in reply.body
        tensor = pb.ModelInferRequest.InferInputTensor(
            name="input-0",
            datatype="FP64",
            shape=list(rows.shape),
            contents=pb.InferTensorContents(fp64_contents=rows.ravel()),
        )
        big = pb.ModelInferRequest(model_name="iris", inputs=[tensor])
        _, code, details = asyncio.run(_grpc_call(plane, big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_reply_bytes" in details
        small = _rest_infer(
            plane,
            {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": ROWS[:1].tolist()}]},
        )
        assert small["predict"].shape == (1,)
    finally:
        service.close()


@pytest.mark.parametrize("isolation", ["never", "worker"])
def test_a_model_answering_big_endian_arrays_is_served_as_numbers(tmp_path: Path, isolation: str) -> None:
    # NOTE: labels read from a big-endian file (FITS, some HDF5) make scikit-learn answer '>i8',
    # which the encoders took for BYTES and sent as strings.
    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y.astype(">i8"))
    want = model.predict(ROWS).astype("<i8")
    path = tmp_path / "big-endian.joblib"
    joblib.dump(model, path)
    root = str(tmp_path / "store")
    repo = Repository(LocalStore(root))
    publish_path(repo, path, "iris", version="1", example=ROWS[:1].tolist())
    repo.move_alias("iris", "production", SetTarget("1"))
    app = AppConfig(models=[ModelConfig(name="iris", alias="production", isolation=isolation)])
    service = ModelService(app.models[0], app, Settings(store=root, cache_dir=tmp_path / "cache"))
    service.start()
    try:
        plane = _plane(service)
        tensor = {"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64", "data": ROWS.tolist()}

        async def body() -> AsyncIterator[bytes]:
            yield orjson.dumps({"inputs": [tensor], "outputs": [{"name": "predict"}]})

        reply = asyncio.run(RestApi(plane).handle(HttpRequest("POST", "/v2/models/iris/infer", {}, body)))
        assert reply.status == 200, reply.body
        [output] = orjson.loads(reply.body)["outputs"]
        assert output["datatype"] == "INT64"
        assert output["data"] == want.tolist()
        response, code, details = asyncio.run(_grpc_call(plane, _grpc_request()))
        assert code == grpc.StatusCode.OK, details
        predict = next(o for o in response.outputs if o.name == "predict")
        assert predict.datatype == "INT64"
        np.testing.assert_array_equal(_arrays(response)["predict"], want)
    finally:
        service.close()
