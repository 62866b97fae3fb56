"""The REST API over the data plane and in-memory ports: what every HTTP transport inherits."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from serving.config import AppConfig
from serving.dataplane import DataPlane
from serving.manifest import TensorSpec
from serving.protocol.rest import Reply
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata
from serving.server.local import Waker
from serving.server.rest import HttpRequest, RestApi

CONFIG = AppConfig.model_validate({"models": [{"name": "m"}], "max_body_bytes": 1024, "body_timeout_s": 0.2})
BODY = orjson.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]})


class Port:
    """A model port whose infer raises what it is given, else echoes what reached it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.seen: list[InferRequest] = []
        self.refusals: list[int] = []

    async def infer(self, request: InferRequest) -> InferResponse:
        if self.error is not None:
            raise self.error
        self.seen.append(request)
        return InferResponse(request.model, request.version or "1", request.id, dict(request.inputs))

    async def metadata(self, version: str | None) -> ModelMetadata:
        spec = TensorSpec(name="x", datatype="FP32", shape=[-1])
        return ModelMetadata("m", [version or "1"], "sklearn", [spec], [spec])

    async def refused(self, version: str | None, status: int) -> None:
        self.refusals.append(status)

    async def ready(self, version: str | None) -> bool:
        return True

    async def status(self) -> dict[str, Any]:
        return {}


class Loads:
    """A load port that counts requests and waits."""

    def __init__(self) -> None:
        self.requests = 0
        self.waits = 0
        self.release = asyncio.Event()

    async def request(self, model: str) -> int:
        self.requests += 1
        return 1

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        self.waits += 1
        await self.release.wait()
        return True

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {"m": {"r": {"live_version": "1", "target_version": "1"}}}


def request(
    path: str, chunks: list[bytes] | None = None, method: str = "POST", **headers: str
) -> HttpRequest:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks or []:
            if chunk == b"<hang>":
                await asyncio.sleep(10)
            yield chunk

    return HttpRequest(method, path, headers, body)


def api(models: dict[str, Port], loads: Loads | None = None, **kw: Any) -> RestApi:
    return RestApi(DataPlane(kw.pop("config", CONFIG), models, loads or Loads(), **kw))


def handle(rest: RestApi, req: HttpRequest) -> Reply:
    return asyncio.run(rest.handle(req))


def test_an_unexpected_error_is_a_500_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frontend = api({"m": Port(RuntimeError("boom"))})
    with caplog.at_level(logging.ERROR):
        reply = handle(frontend, request("/v2/models/m/infer", [BODY]))
    assert reply.status == 500
    assert b"RuntimeError" in reply.body
    assert b"boom" not in reply.body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    consumed: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            consumed.append(i)
            yield b"x" * 600

    frontend = api({"m": Port()})
    reply = handle(frontend, HttpRequest("POST", "/v2/models/m/infer", {}, body))
    assert reply.status == 413
    assert len(consumed) == 2


def test_a_body_that_stops_arriving_is_a_408() -> None:
    frontend = api({"m": Port()})
    reply = handle(frontend, request("/v2/models/m/infer", [b"{", b"<hang>"]))
    assert reply.status == 408


def test_the_root_path_is_stripped_before_routing() -> None:
    frontend = api({"m": Port()})
    req = HttpRequest("GET", "/prefix/v2/health/live", {}, request("/").body, root_path="/prefix")
    assert handle(frontend, req).status == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Basic abc"}, 401), ({"authorization": "Bearer nope"}, 403)],
)
def test_load_refuses_a_missing_or_wrong_admin_token(headers: dict[str, str], status: int) -> None:
    loads = Loads()
    frontend = api({"m": Port()}, loads, admin_token="s3cret")
    req = HttpRequest("POST", "/v2/repository/models/m/load", headers, request("/").body)
    assert handle(frontend, req).status == status
    assert loads.requests == 0


def test_concurrent_load_requests_share_one_wait() -> None:
    loads = Loads()
    frontend = api({"m": Port()}, loads, admin_token="s3cret")
    auth = {"authorization": "Bearer s3cret"}

    async def flood() -> list[Reply]:
        calls = [
            frontend.handle(HttpRequest("POST", "/v2/repository/models/m/load", auth, request("/").body))
            for _ in range(50)
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        loads.release.set()
        return await asyncio.gather(*tasks)

    replies = asyncio.run(flood())
    assert {r.status for r in replies} == {200}
    assert loads.waits == 1


def test_a_load_request_joins_one_that_has_not_started() -> None:
    """At most one forced check runs and one waits, however many are asked for."""
    stop = threading.Event()
    waker = Waker(stop)
    first = waker.request()
    assert waker.request() == first  # queued: joins
    assert waker.wait(0) is True  # the watcher starts the forced tick
    second = waker.request()
    assert second == first + 1  # a tick is running: queue one more
    assert waker.request() == second
    assert not waker.wait_done(second, 0)
    assert waker.wait(0) is True
    assert waker.wait_done(first, 0)


def test_a_load_request_is_done_only_by_a_tick_that_read_the_alias() -> None:
    """A tick whose alias check the store failed has not looked: the request waits for one that has."""
    waker = Waker(threading.Event())
    generation = waker.request()
    assert waker.wait(0) is True  # the forced tick starts
    assert waker.wait(0, read=False) is False  # ... and the store fails it
    assert not waker.wait_done(generation, 0)
    waker.wait(0, read=True)  # the next tick reads the alias
    assert waker.wait_done(generation, 0)


def test_the_routing_header_reaches_the_model_as_a_typed_key() -> None:
    """The canary's sticky header becomes the request's routing key; no other header crosses."""
    port = Port()
    frontend = api({"m": port})
    headers = {"x-request-id": "caller-1", "authorization": "Bearer x", "cookie": "c"}
    assert (
        handle(frontend, HttpRequest("POST", "/v2/models/m/infer", headers, request("/", [BODY]).body)).status
        == 200
    )
    v1 = orjson.dumps({"instances": [[1.0]]})
    assert (
        handle(frontend, HttpRequest("POST", "/v1/models/m:predict", headers, request("/", [v1]).body)).status
        == 200
    )
    assert [r.routing_key for r in port.seen] == ["caller-1", "caller-1"]
    assert port.seen[1].primary_only
    custom_port = Port()
    custom = api(
        {"m": custom_port},
        config=AppConfig.model_validate({"models": [{"name": "m"}], "routing_header": "X-Caller"}),
    )
    routed = {"x-caller": "7", "x-request-id": "other"}
    handle(custom, HttpRequest("POST", "/v2/models/m/infer", routed, request("/", [BODY]).body))
    assert custom_port.seen[0].routing_key == "7"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/iris%2Fversions%2F7/infer",
        "/v2/models/iris%2Fversions%2F7/versions/1/infer",
        "/v2/models/m/versions/..%2F2/infer",
    ],
)
def test_an_encoded_slash_in_a_name_is_a_400_not_another_route(path: str) -> None:
    """A model name or version with '/' is refused as the gRPC field is, not read as a path."""
    port = Port()
    reply = handle(api({"m": port, "iris": port}), request(path, [BODY]))
    assert reply.status == 400
    assert b"invalid" in reply.body
    assert port.seen == []


def test_metadata_encodes_the_typed_answer() -> None:
    reply = handle(api({"m": Port()}), request("/v2/models/m/versions/3", method="GET"))
    assert orjson.loads(reply.body)["versions"] == ["3"]
    assert orjson.loads(reply.body)["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]


def test_an_infer_reply_carries_what_the_port_answered() -> None:
    reply = handle(api({"m": Port()}), request("/v2/models/m/infer", [BODY]))
    body = orjson.loads(reply.body)
    assert body["outputs"] == [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]
    assert np.asarray(body["outputs"][0]["data"]).dtype == np.float64


def test_a_request_that_does_not_decode_is_counted_by_its_model() -> None:
    """Malformed JSON never reaches a version, but the model's request metrics still count it."""
    port = Port()
    reply = handle(api({"m": port}), request("/v2/models/m/infer", [b"{bad"]))
    assert reply.status == 400
    assert port.refusals == [400]
    assert port.seen == []
