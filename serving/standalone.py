"""A single-process server, no Ray: every configured model behind one raw ASGI app.

The same core as the Ray app (:class:`serving.service.ModelService` per model,
:mod:`serving.api`'s router, codec and error handler) and the same routes and
replies as :class:`serving.app.Ingress`, without the Ray hops::

    serving serve --standalone --model iris@production --port 8000 --metrics-port 8080

What it trades away: Ray's autoscaling, multi-node placement and per-model
replica counts. Scale with one process per pod, or ``--workers N`` (separate
uvicorn processes that share the node-local loader cache; each follows the
alias on its own).

Per model, one background thread loads the first version and then runs
:func:`serving.watcher.run_forever`; ``POST /v2/repository/models/{name}/load``
cuts its wait short (a forced tick) and answers once that tick is done. Model
loading never runs on the event loop. Predict does, by default (``predict``
``"inline"``): for small models a thread hop costs more than the model; pass
``"thread"`` for models slow enough to stall other requests.

Metrics are prometheus_client's default registry, served on ``--metrics-port``
with the names of :mod:`serving.metrics` as they are, without Ray's ``ray_``
prefix. With ``--workers N`` > 1 the workers write to a
``PROMETHEUS_MULTIPROC_DIR`` and the parent serves the sum (gauges per worker,
labelled ``pid``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import ExitStack
from typing import Any, Literal

import anyio
import orjson

from serving import api
from serving.config import AppConfig
from serving.errors import ModelNotFound, PayloadTooLarge, ServingError
from serving.service import ModelService, index_entry
from serving.settings import Settings, get_settings
from serving.watcher import run_forever

log = logging.getLogger("serving.standalone")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
PredictMode = Literal["inline", "thread"]

ARGS_ENV = "SERVING_STANDALONE_ARGS"
"""How ``--workers N`` hands the app args to each uvicorn worker process."""

_INFERENCE_HEADER = api.INFERENCE_HEADER.lower().encode()
"""The binary tensor extension's header, as ASGI spells names (lower-case bytes)."""
_LOAD_TIMEOUT_S = 30.0
_START_RETRY_MAX_S = 30.0


class _Waker:
    """One model's wait between watcher ticks, which a load request cuts short.

    Generations count load requests; ``done`` is the newest one whose forced
    tick has finished (``run_forever`` calls ``wait`` after every tick).
    """

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._cond = threading.Condition()
        self._requested = 0
        self._seen = 0
        self._done = 0

    def wait(self, timeout: float) -> bool:
        with self._cond:
            self._done = self._seen
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._requested > self._seen or self._stop.is_set(), timeout)
            forced = self._requested > self._seen
            self._seen = self._requested
            return forced

    def request(self) -> int:
        with self._cond:
            self._requested += 1
            self._cond.notify_all()
            return self._requested

    def wait_done(self, generation: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= generation, timeout)

    @property
    def generation(self) -> int:
        return self._done

    def wake_all(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _Model:
    """A ModelService, its watcher thread and its load requests."""

    def __init__(self, service: ModelService, stop: threading.Event) -> None:
        self.service = service
        self.name = service.config.name
        self.stop = stop
        self.waker = _Waker(stop)
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
                self.waker.wait(delay)
                delay = min(_START_RETRY_MAX_S, delay * 2)
        watcher = self.service.watcher
        if watcher is not None and not self.stop.is_set():
            run_forever(watcher, self.waker.wait, self.stop)
        else:
            # NOTE: a pinned version has nothing to follow; a load request is done at once.
            while not self.stop.is_set():
                self.waker.wait(60.0)


def replica_id() -> str:
    """This process, as the repository index names its one replica."""
    return f"{socket.gethostname()}-{os.getpid()}"


class StandaloneApp:
    """The ASGI app: routes of :class:`serving.app.Ingress`, models in this process.

    Example::

        app = StandaloneApp(AppConfig.model_validate({"models": [{"name": "iris"}]}))
        uvicorn.run(app, port=8000)  # lifespan starts the model threads

    Args:
        config: what to serve (the same args as the Ray app).
        settings: defaults to :func:`serving.settings.get_settings`.
        predict: ``inline`` runs decode/predict/encode on the event loop (fastest for
            small models); ``thread`` runs it in anyio's worker threads.
    """

    def __init__(
        self, config: AppConfig, settings: Settings | None = None, *, predict: PredictMode = "inline"
    ) -> None:
        if predict not in ("inline", "thread"):
            raise ValueError(f"predict must be 'inline' or 'thread', not {predict!r}")
        settings = settings or get_settings()
        self.config = config
        self.predict = predict
        self.replica = replica_id()
        self._stop = threading.Event()
        self._started = False
        self.models = {m.name: _Model(ModelService(m, config, settings), self._stop) for m in config.models}
        self._routes: dict[str, Callable[..., Awaitable[api.Reply]]] = {
            "live": self._live,
            "ready": self._ready,
            "server_metadata": self._server_metadata,
            "repository_index": self._repository_index,
            "load": self._load,
            "model_metadata": self._model_metadata,
            "model_ready": self._model_ready,
            "infer": self._infer,
            "predict_v1": self._predict_v1,
        }

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start each model's load-then-watch thread (returns at once)."""
        if self._started:
            return
        self._started = True
        for model in self.models.values():
            model.thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the watcher threads and release the loaded versions."""
        self._stop.set()
        for model in self.models.values():
            model.waker.wake_all()
        deadline = time.monotonic() + timeout
        for model in self.models.values():
            if model.thread.is_alive():
                model.thread.join(max(0.0, deadline - time.monotonic()))
            model.service.slot.close()

    # -- ASGI ----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await anyio.to_thread.run_sync(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            route, params = api.match(scope["method"], path)
            reply = await self._routes[route](scope, receive, **params)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        headers = [
            (b"content-type", reply.content_type.encode()),
            (b"content-length", str(len(reply.body)).encode()),
        ]
        # NOTE: the binary tensor extension's Inference-Header-Content-Length.
        headers += [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"request body is {value.decode()} bytes, over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ServingError("the client disconnected before sending the whole body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _model(self, name: str) -> _Model:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(
                f"model {name!r} is not served here; served: {', '.join(sorted(self.models))}"
            )
        return model

    def _inline(self, service: ModelService, version: str | None) -> bool:
        """Whether a request may run on the event loop: never when it would load a version."""
        if self.predict == "thread":
            return False
        if version is None or version == service.slot.version:
            return True
        return version in service.resident.versions()

    async def _call(self, inline: bool, fn: Callable[..., api.Reply], *args: Any) -> api.Reply:
        if inline:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args)

    # -- routes --------------------------------------------------------------------
    async def _live(self, scope: Scope, receive: Receive) -> api.Reply:
        return api.ok({"live": True})

    async def _ready(self, scope: Scope, receive: Receive) -> api.Reply:
        ready = all(m.service.ready(None) for m in self.models.values())
        return api.ok({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, scope: Scope, receive: Receive) -> api.Reply:
        from serving import __version__

        return api.ok({"name": "serving", "version": __version__, "extensions": api.EXTENSIONS})

    async def _model_metadata(
        self, scope: Scope, receive: Receive, model: str, version: str | None = None
    ) -> api.Reply:
        service = self._model(model).service
        return await self._call(self._inline(service, version), service.metadata, version)

    async def _model_ready(
        self, scope: Scope, receive: Receive, model: str, version: str | None = None
    ) -> api.Reply:
        ready = self._model(model).service.ready(version)
        return api.ok({"name": model, "ready": ready}, status=200 if ready else 503)

    async def _infer(
        self, scope: Scope, receive: Receive, model: str, version: str | None = None
    ) -> api.Reply:
        service = self._model(model).service
        body = await self._body(scope, receive)
        headers = None
        for name, value in scope["headers"]:
            if name == _INFERENCE_HEADER:
                headers = {api.INFERENCE_HEADER: value.decode("latin-1")}
        return await self._call(self._inline(service, version), service.infer_v2, body, version, headers)

    async def _predict_v1(self, scope: Scope, receive: Receive, model: str) -> api.Reply:
        service = self._model(model).service
        body = await self._body(scope, receive)
        return await self._call(self._inline(service, None), service.predict_v1, body)

    async def _repository_index(self, scope: Scope, receive: Receive) -> api.Reply:
        return api.ok([self._entry(m) for m in self.models.values()])

    def _entry(self, model: _Model) -> dict[str, Any]:
        state = {
            **model.service.status(),
            "generation": model.waker.generation,
            "reported_at": time.time(),
        }
        return index_entry(model.service.config, {self.replica: state})

    async def _load(self, scope: Scope, receive: Receive, model: str) -> api.Reply:
        target = self._model(model)
        generation = target.waker.request()
        done = await anyio.to_thread.run_sync(target.waker.wait_done, generation, _LOAD_TIMEOUT_S)
        return api.ok(self._entry(target), status=200 if done else 202)


# -- process entry points -----------------------------------------------------------------
def app_from_env() -> StandaloneApp:
    """The app a ``--workers N`` uvicorn worker builds (uvicorn factory)."""
    # NOTE: uvicorn spawns workers from an import string; the parent passes the
    # app args through the environment, the one way into a spawned worker.
    spec = orjson.loads(os.environ[ARGS_ENV])
    return StandaloneApp(AppConfig.model_validate(spec["app"]), predict=spec["predict"])


def _metrics_server(host: str, port: int, multiproc_dir: str | None) -> None:
    import prometheus_client

    registry: Any = prometheus_client.REGISTRY
    if multiproc_dir is not None:
        from prometheus_client import multiprocess

        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]  # NOTE: untyped in prometheus_client
    prometheus_client.start_http_server(port, addr=host, registry=registry)


def main(args: argparse.Namespace, app_args: dict[str, Any]) -> int:
    """Run uvicorn in the foreground (``serving serve --standalone``)."""
    import uvicorn

    from serving.logs import configure_logging

    configure_logging()
    config = AppConfig.model_validate(app_args)
    workers = max(1, int(getattr(args, "workers", 1) or 1))
    predict: PredictMode = getattr(args, "predict", "inline") or "inline"
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "access_log": False,
        "lifespan": "on",
    }
    log.info(
        "serving %s on http://%s:%d (standalone, %d worker(s), predict %s), metrics on :%d/metrics",
        ", ".join(m.name for m in config.models),
        args.host,
        args.port,
        workers,
        predict,
        args.metrics_port,
    )
    if workers == 1:
        _metrics_server(args.host, args.metrics_port, None)
        uvicorn.run(StandaloneApp(config, predict=predict), **common)
        return 0
    with ExitStack() as stack:
        multiproc = stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-prometheus-"))
        # NOTE: prometheus_client picks its multiprocess value store at import, from the
        # environment; the spawned workers inherit it.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc
        os.environ[ARGS_ENV] = orjson.dumps(
            {"app": config.model_dump(mode="json"), "predict": predict}
        ).decode()
        _metrics_server(args.host, args.metrics_port, multiproc)
        uvicorn.run("serving.standalone:app_from_env", factory=True, workers=workers, **common)
    return 0
