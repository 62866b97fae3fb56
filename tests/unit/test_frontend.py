"""The front end over in-memory ports: what every transport inherits, without a server."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from serving import api
from serving.config import AppConfig
from serving.server.frontend import Frontend, HttpRequest
from serving.server.local import Waker

CONFIG = AppConfig.model_validate({"models": [{"name": "m"}], "max_body_bytes": 1024, "body_timeout_s": 0.2})


class Port:
    """A model port whose infer raises what it is given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    async def infer(self, body: bytes, version: str | None, headers: Mapping[str, str] | None) -> api.Reply:
        if self.error is not None:
            raise self.error
        return api.ok({"echo": len(body), "headers": dict(headers or {})})

    async def predict_v1(self, body: bytes, headers: Mapping[str, str] | None = None) -> api.Reply:
        return api.ok({"headers": dict(headers or {})})

    async def metadata(self, version: str | None) -> api.Reply:
        return api.ok({})

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

    return HttpRequest("POST", path, {}, body)


def handle(frontend: Frontend, req: HttpRequest) -> api.Reply:
    return asyncio.run(frontend.handle(req))


def test_an_unexpected_error_is_a_500_logged_once_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    frontend = Frontend(CONFIG, {"m": Port(RuntimeError("boom"))}, Loads())
    with caplog.at_level(logging.ERROR):
        reply = handle(frontend, request("/v2/models/m/infer", [b"{}"]))
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

    frontend = Frontend(CONFIG, {"m": Port()}, Loads())
    reply = handle(frontend, HttpRequest("POST", "/v2/models/m/infer", {}, body))
    assert reply.status == 413
    assert len(consumed) == 2


def test_a_body_that_stops_arriving_is_a_408() -> None:
    frontend = Frontend(CONFIG, {"m": Port()}, Loads())
    reply = handle(frontend, request("/v2/models/m/infer", [b"{", b"<hang>"]))
    assert reply.status == 408


def test_the_root_path_is_stripped_before_routing() -> None:
    frontend = Frontend(CONFIG, {"m": Port()}, Loads())
    req = HttpRequest("GET", "/prefix/v2/health/live", {}, request("/").body, root_path="/prefix")
    assert handle(frontend, req).status == 200


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"authorization": "Basic abc"}, 401), ({"authorization": "Bearer nope"}, 403)],
)
def test_load_refuses_a_missing_or_wrong_admin_token(headers: dict[str, str], status: int) -> None:
    loads = Loads()
    frontend = Frontend(CONFIG, {"m": Port()}, loads, admin_token="s3cret")
    req = HttpRequest("POST", "/v2/repository/models/m/load", headers, request("/").body)
    assert handle(frontend, req).status == status
    assert loads.requests == 0


def test_concurrent_load_requests_share_one_wait() -> None:
    loads = Loads()
    frontend = Frontend(CONFIG, {"m": Port()}, loads, admin_token="s3cret")
    auth = {"authorization": "Bearer s3cret"}

    async def flood() -> list[api.Reply]:
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


def test_only_the_codec_and_routing_headers_cross_to_the_model() -> None:
    """The canary's sticky header reaches the model port (maybe another process); others do not."""
    import orjson

    frontend = Frontend(CONFIG, {"m": Port()}, Loads())
    headers = {"x-request-id": "caller-1", "authorization": "Bearer x", "cookie": "c"}
    infer = handle(frontend, HttpRequest("POST", "/v2/models/m/infer", headers, request("/", [b"{}"]).body))
    assert orjson.loads(infer.body)["headers"] == {"x-request-id": "caller-1"}
    v1 = handle(frontend, HttpRequest("POST", "/v1/models/m:predict", headers, request("/", [b"{}"]).body))
    assert orjson.loads(v1.body)["headers"] == {"x-request-id": "caller-1"}
    custom = Frontend(
        AppConfig.model_validate({"models": [{"name": "m"}], "routing_header": "X-Caller"}),
        {"m": Port()},
        Loads(),
    )
    routed = {"x-caller": "7", "x-request-id": "other"}
    reply = handle(custom, HttpRequest("POST", "/v2/models/m/infer", routed, request("/", [b"{}"]).body))
    assert orjson.loads(reply.body)["headers"] == {"x-caller": "7"}
