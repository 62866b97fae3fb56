"""Where LocalModel runs a request: on the event loop while the model is fast, in a thread when not."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from serving.protocol.types import InferRequest, InferResponse
from serving.server.local import LocalModel

BOUND_S = 0.002


def _spin(seconds: float) -> None:
    """Hold the GIL and a core for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Service:
    """The slice of ModelService that LocalModel reads; each request spins for ``cost_s``."""

    def __init__(self) -> None:
        self.slot = SimpleNamespace(version="1")
        self.resident = SimpleNamespace(versions=lambda: ["1"])
        self.config = SimpleNamespace(offload_predict_after_ms=BOUND_S * 1000, isolation="none", name="m")
        self.cost_s = 0.0
        self.threads: list[int] = []

    def infer(self, request: InferRequest, *, load: bool = True) -> InferResponse:
        self.threads.append(threading.get_ident())
        _spin(self.cost_s)
        return InferResponse(request.model, "1", request.id, {})


def _request() -> InferRequest:
    return InferRequest(model="m", inputs={"x": np.zeros(1)})


def _on_loop_share(service: Service, loop_thread: int, last: int) -> float:
    recent = service.threads[-last:]
    return sum(t == loop_thread for t in recent) / len(recent)


def test_a_slow_model_moves_off_the_loop_and_a_fast_one_comes_back_under_load() -> None:
    """Once fast again, a model returns to the loop even while concurrent requests fight for the GIL."""
    service = Service()
    port = LocalModel(service)  # type: ignore[arg-type]  # NOTE: the slice above is all it reads
    stop = threading.Event()

    def contend() -> None:
        # NOTE: a second Python thread that wants the GIL all the time, as other requests' work does.
        while not stop.is_set():
            _spin(0.001)

    async def main() -> tuple[float, float, float]:
        loop_thread = threading.get_ident()
        await port.infer(_request())
        fast_before = _on_loop_share(service, loop_thread, 1)
        service.cost_s = 4 * BOUND_S
        for _ in range(20):
            await port.infer(_request())
        slow = _on_loop_share(service, loop_thread, 5)
        service.cost_s = 0.0
        contender = threading.Thread(target=contend)
        contender.start()
        try:
            for _ in range(10):
                await asyncio.gather(*(port.infer(_request()) for _ in range(16)))
        finally:
            stop.set()
            contender.join()
        return fast_before, slow, _on_loop_share(service, loop_thread, 16)

    fast_before, slow, fast_after = asyncio.run(main())
    assert fast_before == 1.0
    assert slow == 0.0, "requests that take twice the bound still ran on the loop"
    assert fast_after == 1.0, "a model that is fast again stayed off the loop"


def test_requests_near_the_bound_do_not_flap_between_loop_and_thread() -> None:
    """Between half the bound and the bound, a model stays where it is."""
    service = Service()
    port = LocalModel(service)  # type: ignore[arg-type]
    port._recent_s = 0.75 * BOUND_S
    assert port.on_loop(None)
    port._offloaded = True
    assert not port.on_loop(None)
    port._recent_s = 0.4 * BOUND_S
    assert port.on_loop(None)


def test_an_explicit_version_not_loaded_yet_never_runs_on_the_loop() -> None:
    """Its request downloads and loads: always a thread, however fast the model."""
    service = Service()
    port = LocalModel(service)  # type: ignore[arg-type]
    assert port.on_loop("1")
    assert not port.on_loop("2")


def test_zero_means_always_a_thread_and_infinity_only_loads() -> None:
    service = Service()
    always: Any = LocalModel(service, offload_after_s=0)  # type: ignore[arg-type]
    never: Any = LocalModel(service, offload_after_s=float("inf"))  # type: ignore[arg-type]
    never._recent_s = 10.0
    assert not always.on_loop(None)
    assert never.on_loop(None)


def test_a_model_served_by_workers_never_runs_on_the_loop() -> None:
    """Its predict waits for another process, up to its deadline: the loop must not wait with it."""
    service = Service()
    service.config.isolation = "worker"
    model: Any = LocalModel(service, offload_after_s=float("inf"))  # type: ignore[arg-type]
    assert not model.on_loop(None)


def test_a_version_evicted_after_the_check_is_answered_from_a_thread_not_loaded_on_the_loop() -> None:
    """A worker-served request goes to the loop once its version is loaded; if the version is
    evicted before its lease, the lease refuses (it never loads on the loop) and a thread answers."""
    from serving.runtime.slot import NotLoaded

    service: Any = Service()
    service.config.isolation = "worker"
    refused: list[str | None] = []

    async def infer_async(request: InferRequest) -> InferResponse:
        refused.append(request.version)
        raise NotLoaded(request.version)

    service.infer_async = infer_async
    model = LocalModel(service)

    async def main() -> tuple[InferResponse, int]:
        request = InferRequest(model="m", inputs={"x": np.zeros(1)}, version="1")
        return await model.infer(request), threading.get_ident()

    try:
        response, loop_thread = asyncio.run(main())
    finally:
        model.close()
    assert refused == ["1"], "the loaded version did not go to the loop first"
    assert response.version == "1"
    assert service.threads, "no thread answered"
    assert service.threads[-1] != loop_thread, "the fallback ran on the loop"


def test_an_in_process_version_evicted_after_the_check_is_loaded_on_a_thread_not_the_loop() -> None:
    """On the loop, a fast in-process model's request may not load; a version evicted after
    on_loop() saw it is then asked for again from a thread, which may load it."""
    from serving.runtime.slot import NotLoaded

    service: Any = Service()
    calls: list[tuple[bool, int]] = []

    def infer(request: InferRequest, *, load: bool = True) -> InferResponse:
        calls.append((load, threading.get_ident()))
        if not load:
            raise NotLoaded(request.version)
        return InferResponse(request.model, "1", request.id, {})

    service.infer = infer
    model = LocalModel(service)

    async def main() -> tuple[InferResponse, int]:
        request = InferRequest(model="m", inputs={"x": np.zeros(1)}, version="1")
        return await model.infer(request), threading.get_ident()

    response, loop_thread = asyncio.run(main())
    assert response.version == "1"
    assert calls[0] == (False, loop_thread), "the loaded version was not tried on the loop first"
    assert calls[1][0] is True
    assert calls[1][1] != loop_thread, "the load ran on the loop"
