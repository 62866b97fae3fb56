"""A single-process server, no Ray: every configured model behind one raw ASGI app.

A thin adapter: :class:`serving.dataplane.DataPlane` holds every operation,
over :class:`serving.server.local.LocalModel` ports (the same
:class:`serving.runtime.service.ModelService` per model as a Ray replica) and
:class:`serving.server.local.LocalLoads`. This module only converts ASGI to the
REST API's requests (:mod:`serving.server.rest`) and runs the models' watcher threads. With ``--grpc-port``
(8001 by default) a ``grpc.aio`` server on the same event loop answers OIP over
gRPC over the same data plane (:mod:`serving.server.grpc`)::

    serving serve --standalone --model iris@production --port 8000 --metrics-port 8080 --grpc-port 8001

What it trades away: Ray's autoscaling, multi-node placement and per-model
replica counts. Scale with one process per pod, or ``--workers N`` (separate
uvicorn processes that share the node-local loader cache; each follows the
alias on its own).

Per model, one background thread loads the first version and then runs
:func:`serving.runtime.watcher.run_forever`; ``POST /v2/repository/models/{name}/load``
cuts its wait short (a forced tick) and answers once that tick is done. Model
loading never runs on the event loop; predict does while the model is fast
(``offload_predict_after_ms``; ``--predict thread`` always moves it to worker
threads, ``--predict inline`` keeps it on the loop).

Metrics are prometheus_client's default registry, served on ``--metrics-port``
with the names of :mod:`serving.metrics` as they are, without Ray's ``ray_``
prefix. With ``--workers N`` > 1 the workers write to a
``PROMETHEUS_MULTIPROC_DIR`` and the parent serves the sum (gauges per worker,
labelled ``pid``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any, Literal

import anyio
import orjson

from serving.config import AppConfig
from serving.dataplane import DataPlane
from serving.runtime.pool import ModelPool
from serving.runtime.service import ModelService, close_shared_pools
from serving.runtime.watcher import run_forever
from serving.server.asgi import Receive, Scope, Send, request_from_asgi, send_reply
from serving.server.local import (
    MEMBER_MEMORY_AGE_S,
    LocalLoads,
    LocalMember,
    LocalModel,
    PooledModels,
    Waker,
    open_pool,
)
from serving.server.rest import RestApi
from serving.settings import Settings, get_settings

log = logging.getLogger(__name__)

PredictMode = Literal["auto", "inline", "thread"]

ARGS_ENV = "SERVING_STANDALONE_ARGS"
"""How ``--workers N`` hands the app args to each uvicorn worker process."""

_START_RETRY_MAX_S = 30.0


class _Model:
    """A ModelService, its watcher thread and its load requests.

    A named model's thread loads it, retrying until it does, then follows its alias.
    A model-set member is a :class:`serving.runtime.pool.Member`: the pool calls
    :meth:`load` (the first version, in the caller's thread; a failure is the
    caller's error) and :meth:`close` (stop following, unload).
    """

    def __init__(self, service: ModelService, stop: threading.Event, offload: float | None = None) -> None:
        self.service = service
        self.name = service.config.name
        self.stop = stop
        self.waker = Waker(stop)
        self.port = LocalModel(service, offload)
        self.thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)

    def _run(self) -> None:
        # NOTE: the Ray replica fails and is restarted when nothing loads; here the
        # process stays up (live, not ready) and retries, a load request retries at once.
        delay = 1.0
        while not self.stop.is_set():
            try:
                self.service.start()
                break
            except Exception as exc:  # noqa: BLE001 -- NOTE: keep retrying whatever failed
                log.warning("model %s did not load: %s; retrying in %.0f s", self.name, exc, delay)
                # NOTE: nothing loaded: a load request waits for a start that does.
                self.waker.wait(delay, read=False)
                delay = min(_START_RETRY_MAX_S, delay * 2)
        self._follow()

    def _follow(self) -> None:
        watcher = self.service.watcher
        if watcher is not None and not self.stop.is_set():
            run_forever(watcher, self.waker.wait, self.stop)
        else:
            # NOTE: a pinned version has nothing to follow; a load request is done at once.
            while not self.stop.is_set():
                self.waker.wait(60.0)

    # -- as a pool member --------------------------------------------------------------
    def load(self) -> None:
        self.service.start()
        self.thread = threading.Thread(target=self._follow, name=f"watch-{self.name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.waker.wake_all()
        if self.thread.is_alive():
            self.thread.join(5.0)
        self.service.close()
        self.port.close()

    def memory_bytes(self) -> int:
        return self.service.memory_bytes(max_age_s=MEMBER_MEMORY_AGE_S)

    def nudge(self) -> None:
        self.waker.request()


@dataclass(frozen=True)
class GrpcListen:
    """Where the standalone server answers OIP over gRPC (:mod:`serving.server.grpc`)."""

    host: str
    port: int
    reuse_port: bool = False
    """Share the port with the other ``--workers`` processes (the kernel spreads connections)."""


_GRPC_GRACE_S = 3.0
"""How long in-flight RPCs may finish once the server stops."""

_OFFLOAD = {"inline": math.inf, "thread": 0.0}
"""``--predict`` overrides of each model's ``offload_predict_after_ms`` (``auto``: the model's)."""


class StandaloneApp:
    """The ASGI app: the REST routes over one data plane, every model in this process.

    Example::

        app = StandaloneApp(AppConfig.model_validate({"models": [{"name": "iris"}]}))
        uvicorn.run(app, port=8000)  # lifespan starts the model threads

    Args:
        config: what to serve (the same args as the Ray app).
        settings: defaults to :func:`serving.settings.get_settings`.
        predict: ``auto`` follows each model's ``offload_predict_after_ms``; ``inline``
            keeps predict on the event loop, ``thread`` always moves it to worker threads.
    """

    def __init__(
        self,
        config: AppConfig,
        settings: Settings | None = None,
        *,
        predict: PredictMode = "auto",
        grpc: GrpcListen | None = None,
    ) -> None:
        if predict not in ("auto", "inline", "thread"):
            raise ValueError(f"predict must be 'auto', 'inline' or 'thread', not {predict!r}")
        settings = settings or get_settings()
        self.config = config
        self.grpc = grpc
        self._grpc_server: Any = None
        self._stop = threading.Event()
        self._started = False
        offload = _OFFLOAD.get(predict)
        self.models = {
            m.name: _Model(ModelService(m, config, settings), self._stop, offload) for m in config.named
        }
        self.pool: ModelPool[LocalMember] | None = None
        sets: PooledModels | None = None
        loads = LocalLoads({name: (m.service, m.waker) for name, m in self.models.items()}, self._members)
        if config.model_sets:
            sets = open_pool(config, settings, lambda svc: _Model(svc, threading.Event(), offload), loads)
            self.pool = sets.pool
        self._sets = sets
        self.plane = DataPlane(
            config,
            {name: m.port for name, m in self.models.items()},
            loads,
            admin_token=settings.admin_token_value(),
            sets=sets,
        )
        self.rest = RestApi(self.plane)

    def _members(self) -> dict[str, tuple[ModelService, Waker]]:
        """The model-set members loaded now, with their wakers."""
        out: dict[str, tuple[ModelService, Waker]] = {}
        if self.pool is None:
            return out
        for name, member in self.pool.members().items():
            if isinstance(member, _Model):
                out[name] = (member.service, member.waker)
        return out

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start each model's load-then-watch thread (returns at once)."""
        if self._started:
            return
        self._started = True
        for model in self.models.values():
            model.thread.start()
        if self._sets is not None:
            self._sets.start(self._stop)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the watcher threads and release the loaded versions."""
        self._stop.set()
        for model in self.models.values():
            model.waker.wake_all()
        deadline = time.monotonic() + timeout
        for model in self.models.values():
            if model.thread.is_alive():
                model.thread.join(max(0.0, deadline - time.monotonic()))
            model.service.close()
        if self.pool is not None:
            self.pool.close()
        close_shared_pools()

    async def _start_grpc(self) -> None:
        """Serve OIP over gRPC beside HTTP, on this loop and over the same data plane."""
        if self.grpc is None:
            return
        from serving.server.grpc import start_server

        self._grpc_server = await start_server(
            self.plane, self.grpc.host, self.grpc.port, reuse_port=self.grpc.reuse_port
        )
        log.info("serving OIP over gRPC on %s:%d", self.grpc.host, self.grpc.port)

    # -- ASGI ----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            reply = await self.rest.handle(request_from_asgi(scope, receive))
            await send_reply(send, reply)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                try:
                    await self._start_grpc()
                except OSError as exc:
                    # NOTE: uvicorn logs the message and exits (status 3).
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._grpc_server is not None:
                    await self._grpc_server.stop(_GRPC_GRACE_S)
                await anyio.to_thread.run_sync(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return


# -- process entry points -----------------------------------------------------------------
def app_from_env() -> StandaloneApp:
    """The app a ``--workers N`` uvicorn worker builds (uvicorn factory)."""
    # NOTE: uvicorn spawns workers from an import string; the parent passes the
    # app args through the environment, the one way into a spawned worker.
    spec = orjson.loads(os.environ[ARGS_ENV])
    grpc = GrpcListen(**spec["grpc"]) if spec.get("grpc") else None
    return StandaloneApp(AppConfig.model_validate(spec["app"]), predict=spec["predict"], grpc=grpc)


def _metrics_server(host: str, port: int, multiproc_dir: str | None) -> None:
    import prometheus_client

    registry: Any = prometheus_client.REGISTRY
    if multiproc_dir is not None:
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]  # NOTE: untyped in prometheus_client
    prometheus_client.start_http_server(port, addr=host, registry=registry)


def _own_signals_server() -> type[Any]:
    import uvicorn

    class OwnSignals(uvicorn.Server):
        """uvicorn's server, stopping on SIGINT/SIGTERM with one log line and no re-raised signal.

        NOTE: uvicorn re-raises the signal it caught once it has shut down, which
        asyncio turns into a KeyboardInterrupt traceback inside the lifespan task.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            def on_signal(signum: int, frame: Any) -> None:
                if not self.should_exit:
                    log.info("stopping on %s", signal.Signals(signum).name)
                self.handle_exit(signum, frame)

            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return OwnSignals


def main(args: argparse.Namespace, app_args: dict[str, Any]) -> int:
    """Run uvicorn in the foreground (``serving serve --standalone``)."""
    import uvicorn

    from serving.logs import configure_logging
    from serving.server import connections

    configure_logging()
    config = AppConfig.model_validate(app_args)
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    predict: PredictMode = getattr(args, "predict", "auto") or "auto"
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
        # NOTE: SIGINT/SIGTERM stop the server within seconds even with clients still connected.
        "timeout_graceful_shutdown": 3,
        # NOTE: a header deadline and a connection limit that evicts idle connections.
        "http": connections.PROTOCOL,
        "timeout_keep_alive": connections.limits().keep_alive_s,
    }
    grpc_port = int(getattr(args, "grpc_port", 0) or 0)
    grpc = GrpcListen(args.host, grpc_port, reuse_port=workers > 1) if grpc_port else None
    log.info(
        "serving %s on http://%s:%d (standalone, %d worker(s), predict %s), metrics on :%d/metrics",
        ", ".join(m.ref if m.prefix is not None else m.name for m in config.models),
        args.host,
        args.port,
        workers,
        predict,
        args.metrics_port,
    )
    if workers == 1:
        _metrics_server(args.host, args.metrics_port, None)
        app = StandaloneApp(config, predict=predict, grpc=grpc)
        server = _own_signals_server()(uvicorn.Config(app, **common))
        server.run()
        # NOTE: a failed startup (the gRPC port taken) ends run() without serving.
        return 0 if server.started else 1
    with ExitStack() as stack:
        multiproc = stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-prometheus-"))
        # NOTE: prometheus_client picks its multiprocess value store at import, from the
        # environment; the spawned workers inherit it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc
        spec = {"app": config.model_dump(mode="json"), "predict": predict}
        os.environ[ARGS_ENV] = orjson.dumps({**spec, "grpc": asdict(grpc) if grpc else None}).decode()
        _metrics_server(args.host, args.metrics_port, multiproc)
        uvicorn.run("serving.server.standalone:app_from_env", factory=True, workers=workers, **common)
    return 0
