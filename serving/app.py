"""Ray Serve deployments: thin adapters around :class:`serving.dataplane.DataPlane`.

``build_app`` is the import path a Serve config uses::

    applications:
      - name: serving
        import_path: serving.app:build_app
        args: {models: [{name: iris, alias: production}]}

Two layouts (``AppConfig.layout``):

- ``single-hop`` (the default): one deployment, :class:`Server`, whose every
  replica holds the routes and every model. A request crosses one hop: the
  proxy (or HAProxy with direct ingress) to a replica, which predicts in
  process. Replicas are sized and scaled by the ``ingress`` block, for all models
  together.
- ``two-hop``: :class:`Ingress` in front of one :class:`ModelDeployment` per
  model, each with its own replicas and autoscaling, at the cost of one more
  actor call per request.

Replicas report what they serve to a small named "board" actor, which also
carries load requests: a watcher's wait between alias checks is a long-poll on
the board, so ``POST /v2/repository/models/{name}/load`` wakes every replica of
the model at once. The board lives on the Ray head node (which a cluster cannot
lose and keep running) and is restarted in place if its process dies; see
:data:`BOARD_OPTIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from serving import metrics
from serving.config import AppConfig, ModelConfig
from serving.dataplane import DataPlane, ModelPort
from serving.errors import InternalError, ServingError
from serving.logs import configure_logging
from serving.protocol.rest import Reply
from serving.protocol.tensors import conform
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata, describe_error
from serving.server.asgi import request_from_asgi

# NOTE: imported here, not lazily: a request the Serve proxy pickles to this replica
# needs the codec module's alias of the generated classes before any method runs.
from serving.server.grpc import InferenceServicer
from serving.server.local import LocalModel
from serving.server.rest import RestApi
from serving.service import ModelService
from serving.settings import get_settings
from serving.slot import Live
from serving.watcher import run_forever

log = logging.getLogger(__name__)

BOARD_NAMESPACE = "serving"
HEAD_NODE_RESOURCE = "node:__internal_head__"
"""A resource only Ray's head node has (one unit)."""
BOARD_OPTIONS: dict[str, Any] = {
    # NOTE: pinned to the head. Left to the scheduler, the board landed on a worker node;
    # when that node died, surviving replicas kept a handle to the dead actor (load requests
    # answered 500 ActorDiedError) while new replicas made a second board: a split index.
    # The head holds the GCS, so losing it loses the cluster, board or not.
    "resources": {HEAD_NODE_RESOURCE: 0.001},
    # NOTE: a board whose process dies alone comes back on the head under the same handle;
    # calls in flight are retried (every method is safe to repeat). Its state comes back
    # from the replicas: reports within one wait, generations in ``wait``.
    "max_restarts": -1,
    "max_task_retries": -1,
}
"""How the board actor is placed and restarted (see :func:`get_board`)."""


@ray.remote(num_cpus=0)
class Board:
    """What each replica serves, and per-model load requests (a generation counter).

    Generations only grow, across restarts too: a new one is at least the wall clock
    in milliseconds, and a replica that has seen more than the board knows (the board
    restarted) lifts the board's count to its own.

    A load request joins one that no replica has started yet, so each model has at
    most one forced check in flight and one queued, however many requests arrive.
    """

    def __init__(self) -> None:
        self._generation: dict[str, int] = defaultdict(int)
        self._seen: dict[str, dict[str, int]] = defaultdict(dict)
        self._replicas: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self._changed = asyncio.Condition()

    async def report(self, model: str, replica: str, status: dict[str, Any]) -> None:
        self._replicas[model][replica] = {**status, "reported_at": time.time()}

    async def forget(self, model: str, replica: str) -> None:
        self._replicas[model].pop(replica, None)
        self._seen[model].pop(replica, None)

    async def request_load(self, model: str) -> int:
        async with self._changed:
            current = self._generation[model]
            seen = self._seen[model].values()
            queued = current > 0 and bool(seen) and all(s < current for s in seen)
            if not queued:
                # NOTE: at least the wall clock in ms, so a restarted board (counting from 0)
                # still hands out generations above any a replica has seen.
                self._generation[model] = max(current + 1, time.time_ns() // 1_000_000)
                self._changed.notify_all()
            return self._generation[model]

    async def wait(self, model: str, replica: str, seen: int, timeout: float) -> int:
        """Return the model's load generation as soon as it exceeds ``seen``, or at timeout."""
        async with self._changed:
            if seen > self._generation[model]:
                # NOTE: a restarted board counts from 0 while its replicas kept their count:
                # take theirs, or no load request would wake them until the count caught up.
                self._generation[model] = seen
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._generation[model] > seen), timeout
                )
            generation = self._generation[model]
            self._seen[model][replica] = generation
            return generation

    async def snapshot(self, max_age_s: float) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {}
        for model, replicas in self._replicas.items():
            fresh = {r: s for r, s in replicas.items() if now - s["reported_at"] <= max_age_s}
            out[model] = {"generation": self._generation[model], "replicas": fresh}
        return out


def get_board(app_name: str) -> Any:
    return Board.options(  # type: ignore[attr-defined]
        name=f"board-{app_name}",
        namespace=BOARD_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **BOARD_OPTIONS,
    ).remote()


def _replica_context() -> tuple[str, str]:
    ctx = serve.get_replica_context()
    return ctx.app_name, ctx.replica_id.unique_id


REPORT_EVERY_S = 10.0
"""A replica reports what it serves at least this often, whatever the poll interval."""


def _max_age_s(app: AppConfig) -> float:
    """How old a replica's last report may be before the index forgets the replica."""
    return 3 * min(app.poll_interval_s, REPORT_EVERY_S) + 10


class BoardLoads:
    """The load port of a Ray app: load requests and replica reports go through the board."""

    def __init__(self, board: Any, app: AppConfig) -> None:
        self._board = board
        self._max_age_s = _max_age_s(app)

    async def request(self, model: str) -> int:
        return int(await self._board.request_load.remote(model))

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            replicas = (await self.snapshot()).get(model, {})
            if replicas and all(r.get("generation", 0) >= generation for r in replicas.values()):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        snap = await self._board.snapshot.remote(self._max_age_s)
        return {model: entry["replicas"] for model, entry in snap.items()}


class _Follower:
    """One model in one replica: loads the first version, then follows the alias via the board."""

    def __init__(self, service: ModelService, board: Any, replica: str) -> None:
        self.service = service
        self.name = service.config.name
        self._board = board
        self._replica = replica
        self._generation = 0
        self._stop = threading.Event()
        self._node_id = ray.get_runtime_context().get_node_id()

    def start(self) -> None:
        """Load the first version (raises if none loads: the replica is not healthy) and follow."""
        self.service.start()
        self._report()
        if self.service.watcher is not None:
            threading.Thread(
                target=run_forever,
                args=(self.service.watcher, self._wait, self._stop),
                name=f"watch-{self.name}",
                daemon=True,
            ).start()

    def stop(self) -> None:
        """Stop following and take this replica off the board (a graceful replica shutdown)."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._board.forget.remote(self.name, self._replica)

    def _report(self) -> None:
        status = {**self.service.status(), "generation": self._generation, "node_id": self._node_id}
        self._board.report.remote(self.name, self._replica, status)

    def _wait(self, timeout: float) -> bool:
        """Sleep until the next tick or a load request (True then), reporting every REPORT_EVERY_S."""
        deadline = time.monotonic() + timeout
        while True:
            self._report()
            chunk = max(0.0, min(REPORT_EVERY_S, deadline - time.monotonic()))
            try:
                gen = int(ray.get(self._board.wait.remote(self.name, self._replica, self._generation, chunk)))
            except Exception:  # noqa: BLE001 -- NOTE: board gone (cluster shutting down): plain wait
                self._stop.wait(chunk)
                gen = self._generation
            if gen > self._generation:
                self._generation = gen
                return True
            if self._stop.is_set() or time.monotonic() >= deadline:
                return False


@dataclass(frozen=True)
class _Failed:
    """One request's failure inside a batch (the others still get their outputs)."""

    error: Exception


class BatchedModel(LocalModel):
    """A local model port whose live-version infers go through ``@serve.batch``.

    Each request leases the live version, conforms its inputs to it and waits for
    its batch under that lease; a batch predicts once per version it holds, so a
    swap while requests wait never mixes two versions. When a joined batch fails,
    each of its requests is predicted alone, so one bad request fails only itself.
    """

    def __init__(self, service: ModelService) -> None:
        super().__init__(service)
        batching = service.config.batching
        self._batched = serve.batch(
            max_batch_size=batching.max_batch_size, batch_wait_timeout_s=batching.batch_wait_timeout_s
        )(self._predict_batch)

    async def infer(self, request: InferRequest) -> InferResponse:
        service = self.service
        if request.version is not None or request.primary_only or service.split.shadow_fraction > 0:
            # NOTE: explicit versions, v1 and mirrored requests are answered unbatched.
            return await super().infer(request)
        role = service.choose(request.routing_key)
        if role != "live":
            # NOTE: the canary's share is answered unbatched, routed once, here.
            return await self._run(None, service.infer, request, role)
        started = time.perf_counter()
        served, status = service.slot.version or "none", 200
        try:
            with service.slot.lease() as live:
                served = live.version
                inputs = conform(request.inputs, live.predictor.inputs)
                outputs = await self._batched((live, inputs))
                if isinstance(outputs, _Failed):
                    raise outputs.error
                return service.respond(live, request, outputs)
        except BaseException as exc:
            status = exc.status_code if isinstance(exc, ServingError) else 500
            raise
        finally:
            service.observe(served, status, started)

    async def _predict_batch(
        self, batch: list[tuple[Live, dict[str, np.ndarray]]]
    ) -> list[dict[str, np.ndarray] | _Failed]:
        """Predict each version's share of the batch together; results in the batch's order."""
        groups: dict[int, list[int]] = {}
        for i, (live, _) in enumerate(batch):
            groups.setdefault(id(live), []).append(i)
        results: list[dict[str, np.ndarray] | _Failed] = [_Failed(RuntimeError("not predicted"))] * len(batch)
        for indices in groups.values():
            live = batch[indices[0]][0]
            outputs = await self._predict_group(live, [batch[i][1] for i in indices])
            for i, out in zip(indices, outputs, strict=True):
                results[i] = out
        return results

    async def _predict_group(
        self, live: Live, items: list[dict[str, np.ndarray]]
    ) -> list[dict[str, np.ndarray] | _Failed]:
        names = list(items[0])
        if len(items) > 1 and all(list(item) == names for item in items):
            sizes = [len(item[names[0]]) for item in items]
            joined = {n: np.concatenate([item[n] for item in items]) for n in names}
            whole = await asyncio.to_thread(self._one, live, joined)
            if not isinstance(whole, _Failed):
                bounds = np.cumsum(sizes)[:-1]
                split = {n: np.split(np.asarray(v), bounds) for n, v in whole.items()}
                return [{n: parts[i] for n, parts in split.items()} for i in range(len(items))]
            # NOTE: the joined batch failed: predict each request alone to find the one(s) at fault.
        return [await asyncio.to_thread(self._one, live, item) for item in items]

    @staticmethod
    def _one(live: Live, item: dict[str, np.ndarray]) -> dict[str, np.ndarray] | _Failed:
        try:
            return ModelService.run(live, item)
        except Exception as exc:  # noqa: BLE001 -- NOTE: handed to that request's error
            return _Failed(exc)


def _model_port(service: ModelService) -> LocalModel:
    return BatchedModel(service) if service.config.batching.enabled else LocalModel(service)


def _replica_setup() -> None:
    configure_logging()
    metrics.use_ray_backend()
    # NOTE: defence in depth for any torch.load that escapes the format loaders.
    os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")


def _response(reply: Reply) -> Response:
    return Response(
        reply.body, status_code=reply.status, media_type=reply.content_type, headers=reply.headers
    )


class GrpcMethods:
    """OIP over gRPC on a Ray Serve ingress replica: Serve calls the method named like the RPC.

    Serve's gRPC ingress (``grpc_options`` naming
    :data:`serving.server.grpc.SERVICER_FUNCTION`) hands each method the
    request message and a context; :class:`serving.server.grpc.InferenceServicer`
    answers it over this replica's data plane, as HTTP is.
    """

    plane: DataPlane
    _grpc: InferenceServicer | None = None

    def _servicer(self) -> InferenceServicer:
        if self._grpc is None:
            self._grpc = InferenceServicer(self.plane)
        return self._grpc

    async def ServerLive(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ServerLive(request, grpc_context)

    async def ServerReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ServerReady(request, grpc_context)

    async def ModelReady(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ModelReady(request, grpc_context)

    async def ServerMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ServerMetadata(request, grpc_context)

    async def ModelMetadata(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ModelMetadata(request, grpc_context)

    async def ModelInfer(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().ModelInfer(request, grpc_context)

    async def RepositoryIndex(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().RepositoryIndex(request, grpc_context)

    async def RepositoryModelLoad(self, request: Any, grpc_context: Any) -> Any:
        return await self._servicer().RepositoryModelLoad(request, grpc_context)


@serve.deployment
class Server(GrpcMethods):
    """Single-hop replica: the routes and every model in one process; not ready until all load."""

    def __init__(self, app: dict[str, Any]) -> None:
        _replica_setup()
        self.app = AppConfig.model_validate(app)
        settings = get_settings()
        app_name, replica = _replica_context()
        board = get_board(app_name)
        services = [ModelService(m, self.app, settings) for m in self.app.models]
        self._followers = [_Follower(s, board, replica) for s in services]
        for follower in self._followers:
            follower.start()
        self.plane = DataPlane(
            self.app,
            {s.config.name: _model_port(s) for s in services},
            BoardLoads(board, self.app),
            admin_token=settings.admin_token_value(),
        )
        self.rest = RestApi(self.plane)

    async def __call__(self, request: Request) -> Response:
        return _response(await self.rest.handle(request_from_asgi(request.scope, request.receive)))

    def __del__(self) -> None:
        for follower in getattr(self, "_followers", []):
            follower.stop()


@serve.deployment
class ModelDeployment:
    """Two-hop model replica: one model, called by :class:`Ingress` through a handle."""

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        _replica_setup()
        config = ModelConfig.model_validate(model)
        service = ModelService(config, AppConfig.model_validate(app), get_settings())
        app_name, replica = _replica_context()
        self._follower = _Follower(service, get_board(app_name), replica)
        self._follower.start()
        self.port = _model_port(service)

    async def infer(self, request: InferRequest) -> InferResponse:
        with _logged_here():
            return await self.port.infer(request)

    async def metadata(self, version: str | None) -> ModelMetadata:
        with _logged_here():
            return await self.port.metadata(version)

    async def ready(self, version: str | None) -> bool:
        return await self.port.ready(version)

    async def status(self) -> dict[str, Any]:
        return await self.port.status()

    def __del__(self) -> None:
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.stop()


@contextlib.contextmanager
def _logged_here() -> Iterator[None]:
    """Log an unexpected error in this replica, with its traceback, and pass on a plain 500.

    NOTE: the ingress would otherwise log Ray's wrapped copy of it a second time, as
    ``RayTaskError(...)``; a ServingError crosses the handle as it is.
    """
    try:
        yield
    except ServingError:
        raise
    except Exception as exc:  # noqa: BLE001 -- NOTE: the one error handler, in this replica
        raise InternalError(describe_error(exc).message) from None


class HandleModel:
    """A model port over a :class:`ModelDeployment`'s handle (the two-hop layout)."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self._handle = handle

    async def infer(self, request: InferRequest) -> InferResponse:
        response: InferResponse = await self._handle.infer.remote(request)
        return response

    async def metadata(self, version: str | None) -> ModelMetadata:
        meta: ModelMetadata = await self._handle.metadata.remote(version)
        return meta

    async def ready(self, version: str | None) -> bool:
        return bool(await self._handle.ready.remote(version))

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self._handle.status.remote()
        return status


@serve.deployment
class Ingress(GrpcMethods):
    """Two-hop ingress: the data plane over handles to the model deployments."""

    def __init__(self, app: dict[str, Any], models: dict[str, DeploymentHandle[Any]]) -> None:
        configure_logging()
        self.app = AppConfig.model_validate(app)
        ports: dict[str, ModelPort] = {name: HandleModel(h) for name, h in models.items()}
        board = get_board(_replica_context()[0])
        self.plane = DataPlane(
            self.app, ports, BoardLoads(board, self.app), admin_token=get_settings().admin_token_value()
        )
        self.rest = RestApi(self.plane)

    async def __call__(self, request: Request) -> Response:
        return _response(await self.rest.handle(request_from_asgi(request.scope, request.receive)))


def _scaling(num_replicas: int | str | None, autoscaling_config: dict[str, Any] | None) -> dict[str, Any]:
    if autoscaling_config is not None:
        return {"autoscaling_config": autoscaling_config}
    return {"num_replicas": num_replicas}


def _logging(config: AppConfig) -> dict[str, Any]:
    return {"logging_config": {"enable_access_log": config.access_log}}


def _deployment_options(model: ModelConfig, config: AppConfig) -> dict[str, Any]:
    """Ray Serve options of one model's deployment (two-hop): replicas or autoscaling, resources."""
    return {
        "name": f"model-{model.name}",
        **_logging(config),
        "ray_actor_options": model.ray_actor_options,
        "max_ongoing_requests": model.max_ongoing_requests,
        **_scaling(model.num_replicas, model.autoscaling_config),
    }


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the Serve application from ``AppConfig`` args (a Serve config's ``args``).

    Example::

        serve.run(build_app({"store": "s3://models/prod", "models": [{"name": "iris"}]}))
    """
    config = AppConfig.model_validate(args)
    app_dict = config.model_dump(mode="json")
    ingress = config.ingress
    options = {
        "ray_actor_options": ingress.ray_actor_options,
        "max_ongoing_requests": ingress.max_ongoing_requests,
        **_scaling(ingress.num_replicas, ingress.autoscaling_config),
        **_logging(config),
    }
    if ingress.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = ingress.max_replicas_per_node
    if config.layout == "single-hop":
        # NOTE: @serve.deployment turns the classes into Deployments; mypy sees classes.
        single: serve.Application = cast(Any, Server).options(name="server", **options).bind(app_dict)
        return single
    handles: dict[str, Any] = {}
    for model in config.models:
        handles[model.name] = (
            cast(Any, ModelDeployment)
            .options(**_deployment_options(model, config))
            .bind(model.model_dump(mode="json"), app_dict)
        )
    application: serve.Application = cast(Any, Ingress).options(**options).bind(app_dict, handles)
    return application
