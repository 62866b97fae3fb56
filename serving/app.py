"""Ray Serve deployments: a thin ingress and one deployment per model.

``build_app`` is the import path a Serve config uses::

    applications:
      - name: serving
        import_path: serving.app:build_app
        args: {models: [{name: iris, alias: production}]}

Each model replica wraps a :class:`serving.service.ModelService`. Replicas
report what they serve to a small named "board" actor, which also carries
load requests: a watcher's wait between alias checks is a long-poll on the
board, so ``POST /v2/repository/models/{name}/load`` wakes every replica of
the model at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any, cast

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from serving import api, metrics
from serving.config import AppConfig, ModelConfig
from serving.errors import ModelNotFound, NotReady
from serving.logs import configure_logging
from serving.service import ModelService, index_entry
from serving.settings import get_settings
from serving.watcher import run_forever

log = logging.getLogger("serving.app")

BOARD_NAMESPACE = "serving"


@ray.remote(num_cpus=0)
class Board:
    """What each replica serves, and per-model load requests (a generation counter)."""

    def __init__(self) -> None:
        self._generation: dict[str, int] = defaultdict(int)
        self._replicas: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self._changed = asyncio.Condition()

    async def report(self, model: str, replica: str, status: dict[str, Any]) -> None:
        self._replicas[model][replica] = {**status, "reported_at": time.time()}

    async def forget(self, model: str, replica: str) -> None:
        self._replicas[model].pop(replica, None)

    async def request_load(self, model: str) -> int:
        async with self._changed:
            self._generation[model] += 1
            self._changed.notify_all()
            return self._generation[model]

    async def wait(self, model: str, seen: int, timeout: float) -> int:
        """Return the model's load generation as soon as it exceeds ``seen``, or at timeout."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._generation[model] > seen), timeout
                )
            return self._generation[model]

    async def snapshot(self, max_age_s: float) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for model, replicas in self._replicas.items():
            fresh = {r: s for r, s in replicas.items() if now - s["reported_at"] <= max_age_s}
            out[model] = {"generation": self._generation[model], "replicas": fresh}
        return out


def get_board(app_name: str) -> Any:
    return Board.options(  # type: ignore[attr-defined]
        name=f"board-{app_name}", namespace=BOARD_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def _replica_context() -> tuple[str, str]:
    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


@serve.deployment
class ModelDeployment:
    """Serves one model; not ready until a version is loaded."""

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        configure_logging()
        metrics.use_ray_backend()
        # NOTE: defence in depth for any torch.load that escapes the format loaders.
        os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
        self.config = ModelConfig.model_validate(model)
        self.app = AppConfig.model_validate(app)
        self.service = ModelService(self.config, self.app, get_settings())
        self.service.start()
        app_name, self.replica = _replica_context()
        self.board = get_board(app_name)
        self._generation = 0
        self._report()
        self._stop = threading.Event()
        if self.service.watcher is not None:
            threading.Thread(
                target=run_forever,
                args=(self.service.watcher, self._wait, self._stop),
                name=f"watch-{self.config.name}",
                daemon=True,
            ).start()
        if self.config.batching.enabled:
            self._batched = serve.batch(
                max_batch_size=self.config.batching.max_batch_size,
                batch_wait_timeout_s=self.config.batching.batch_wait_timeout_s,
            )(self._predict_batch)

    def _report(self) -> None:
        status = {**self.service.status(), "generation": self._generation}
        self.board.report.remote(self.config.name, self.replica, status)

    def _wait(self, timeout: float) -> bool:
        """Report, then sleep until the next tick or a load request (returns True then)."""
        self._report()
        try:
            gen = int(ray.get(self.board.wait.remote(self.config.name, self._generation, timeout)))
        except Exception:  # noqa: BLE001 -- NOTE: board gone (cluster shutting down): plain wait
            self._stop.wait(timeout)
            return False
        forced = gen > self._generation
        self._generation = gen
        return forced

    async def infer(
        self, body: bytes, version: str | None, headers: dict[str, str] | None = None
    ) -> api.Reply:
        """An OIP v2 infer; ``headers`` carries ``Inference-Header-Content-Length`` for binary bodies."""
        if self.config.batching.enabled and version is None:
            return await self._infer_batched(body, headers)
        return self.service.infer_v2(body, version, headers)

    async def _infer_batched(self, body: bytes, headers: dict[str, str] | None = None) -> api.Reply:
        # NOTE: decode per request, predict once per batch, encode per request.
        started = time.perf_counter()
        served = self.service.slot.version or "none"
        try:
            live = self.service.slot.live
            if live is None:
                raise NotReady(f"model {self.config.name!r} has no version loaded yet")
            payload, binary = api.parse_infer_body(body, self.app.max_body_bytes, headers)
            req = api.parse_v2(payload, live.predictor.inputs, binary)
            served, outputs = await self._batched(req.inputs)
            reply = api.infer_reply(self.config.name, served, req, outputs)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        self.service.observe(served, reply.status, started)
        return reply

    async def _predict_batch(
        self, batch: list[dict[str, np.ndarray]]
    ) -> list[tuple[str, dict[str, np.ndarray]]]:
        names = list(batch[0])
        if any(list(item) != names for item in batch):
            return [self.service.predict_arrays(item) for item in batch]
        sizes = [len(item[names[0]]) for item in batch]
        joined = {n: np.concatenate([item[n] for item in batch]) for n in names}
        version, outputs = self.service.predict_arrays(joined)
        bounds = np.cumsum(sizes)[:-1]
        split = {n: np.split(np.asarray(v), bounds) for n, v in outputs.items()}
        return [(version, {n: parts[i] for n, parts in split.items()}) for i in range(len(batch))]

    async def predict_v1(self, body: bytes) -> tuple[int, bytes]:
        reply = self.service.predict_v1(body)
        return reply.status, reply.body

    async def metadata(self, version: str | None) -> tuple[int, bytes]:
        reply = self.service.metadata(version)
        return reply.status, reply.body

    async def ready(self, version: str | None) -> bool:
        return bool(self.service.ready(version))

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


@serve.deployment
class Ingress:
    """Routes HTTP requests to model deployments; no model work happens here."""

    def __init__(self, app: dict[str, Any], models: dict[str, DeploymentHandle[Any]]) -> None:
        configure_logging()
        self.app = AppConfig.model_validate(app)
        self.models = models
        self.board = get_board(_replica_context()[0])
        self._started = time.time()

    async def __call__(self, request: Request) -> Response:
        try:
            path = request.url.path
            # NOTE: under a route prefix other than "/", Serve keeps it in the path.
            root = request.scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            route, params = api.match(request.method, path)
            reply = await getattr(self, f"_{route}")(request, **params)
        except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler maps every error
            reply = api.error_reply(exc)
        return Response(
            reply.body, status_code=reply.status, media_type=reply.content_type, headers=reply.headers
        )

    def _handle(self, model: str) -> DeploymentHandle[Any]:
        handle = self.models.get(model)
        if handle is None:
            raise ModelNotFound(
                f"model {model!r} is not served here; served: {', '.join(sorted(self.models))}"
            )
        return handle

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        limit = self.app.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            from serving.errors import PayloadTooLarge

            raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}")
        return await request.body()

    # -- routes ------------------------------------------------------------------------
    async def _live(self, request: Request) -> api.Reply:
        return api.ok({"live": True})

    async def _ready(self, request: Request) -> api.Reply:
        states = await asyncio.gather(*(h.ready.remote(None) for h in self.models.values()))
        ready = all(states)
        return api.ok({"ready": ready}, status=200 if ready else 503)

    async def _server_metadata(self, request: Request) -> api.Reply:
        from serving import __version__

        return api.ok({"name": "serving", "version": __version__, "extensions": api.EXTENSIONS})

    async def _model_metadata(self, request: Request, model: str, version: str | None = None) -> api.Reply:
        status, body = await self._handle(model).metadata.remote(version)
        return api.Reply(status, body)

    async def _model_ready(self, request: Request, model: str, version: str | None = None) -> api.Reply:
        ready = await self._handle(model).ready.remote(version)
        return api.ok({"name": model, "ready": ready}, status=200 if ready else 503)

    async def _infer(self, request: Request, model: str, version: str | None = None) -> api.Reply:
        handle = self._handle(model)
        body = await self._body(request)
        # NOTE: only the header the codec reads crosses to the model replica.
        length = request.headers.get(api.INFERENCE_HEADER)
        headers = {api.INFERENCE_HEADER: length} if length is not None else None
        reply: api.Reply = await handle.infer.remote(body, version, headers)
        return reply

    async def _predict_v1(self, request: Request, model: str) -> api.Reply:
        handle = self._handle(model)
        body = await self._body(request)
        status, payload = await handle.predict_v1.remote(body)
        return api.Reply(status, payload)

    async def _repository_index(self, request: Request) -> api.Reply:
        return api.ok(await self._index())

    async def _index(self) -> list[dict[str, Any]]:
        max_age = 3 * self.app.poll_interval_s + 10
        snap = await self.board.snapshot.remote(max_age)
        return [index_entry(cfg, snap.get(cfg.name, {}).get("replicas", {})) for cfg in self.app.models]

    async def _load(self, request: Request, model: str) -> api.Reply:
        self._handle(model)
        gen = await self.board.request_load.remote(model)
        deadline = time.monotonic() + 30
        while True:
            snap = await self.board.snapshot.remote(3 * self.app.poll_interval_s + 10)
            replicas = snap.get(model, {}).get("replicas", {})
            done = replicas and all(r.get("generation", 0) >= gen for r in replicas.values())
            if done or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        entry = next(e for e in await self._index() if e["name"] == model)
        return api.ok(entry, status=200 if done else 202)


class _LocalHandle:
    """Calls an in-process deployment object the way a DeploymentHandle is called.

    ``handle.infer.remote(body, version, headers)`` returns the coroutine of ``infer``, which
    the Ingress code awaits exactly as it awaits a DeploymentResponse.
    """

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        class _Method:
            remote = staticmethod(method)

        return _Method


@serve.deployment
class SingleHop(Ingress.func_or_class):  # type: ignore[misc,name-defined]  # NOTE: the class under the Deployment
    """Ingress and model in one replica: the proxy reaches the model in one hop.

    The routes and replies are the Ingress's; the model calls stay in process
    instead of crossing a DeploymentHandle (a second actor call per request).
    """

    def __init__(self, app: dict[str, Any], model: dict[str, Any]) -> None:
        inner = ModelDeployment.func_or_class(model, app)  # type: ignore[attr-defined]
        self._inner = inner
        super().__init__(app, {inner.config.name: _LocalHandle(inner)})


def _deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Ray Serve options of one model's deployment: replicas or autoscaling, resources."""
    options: dict[str, Any] = {
        "name": f"model-{model.name}",
        "ray_actor_options": model.ray_actor_options,
        "max_ongoing_requests": model.max_ongoing_requests,
    }
    if model.autoscaling_config is not None:
        options["autoscaling_config"] = model.autoscaling_config
    else:
        options["num_replicas"] = model.num_replicas
    return options


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the Serve application from ``AppConfig`` args (a Serve config's ``args``)."""
    config = AppConfig.model_validate(args)
    app_dict = config.model_dump(mode="json")
    handles: dict[str, Any] = {}
    for model in config.models:
        options = _deployment_options(model)
        # NOTE: @serve.deployment turns the classes into Deployments; mypy sees classes.
        handles[model.name] = (
            cast(Any, ModelDeployment).options(**options).bind(model.model_dump(mode="json"), app_dict)
        )
    ingress = cast(Any, Ingress).options(
        num_replicas=config.ingress.num_replicas,
        ray_actor_options=config.ingress.ray_actor_options,
        max_ongoing_requests=config.ingress.max_ongoing_requests,
    )
    application: serve.Application = ingress.bind(app_dict, handles)
    return application


def build_single_hop_app(args: dict[str, Any]) -> serve.Application:
    """Build a one-model app whose replicas are both ingress and model (one hop per request).

    The model's ``num_replicas``/``autoscaling_config``, ``ray_actor_options`` and
    ``max_ongoing_requests`` apply to the combined replica; ``ingress`` settings are unused.

    Raises:
        ValueError: the args name more than one model.
    """
    config = AppConfig.model_validate(args)
    if len(config.models) != 1:
        raise ValueError("a single-hop app serves exactly one model; use build_app for several")
    model = config.models[0]
    app: serve.Application = SingleHop.options(**_deployment_options(model)).bind(
        config.model_dump(mode="json"), model.model_dump(mode="json")
    )
    return app
