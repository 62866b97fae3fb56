"""Ray Serve deployments: thin adapters around :class:`serving.dataplane.DataPlane`.

``build_app`` is the import path a Serve config uses::

    applications:
      - name: serving
        import_path: serving.server.ray.app:build_app
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

Replicas report what they serve to the board (:mod:`serving.server.ray.board`),
which also carries load requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, cast

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from serving import metrics
from serving.config import AppConfig, ModelConfig
from serving.dataplane import DataPlane, ModelPort
from serving.errors import InternalError, ModelNotFound, ServingError
from serving.logs import configure_logging
from serving.protocol.rest import Reply
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata, describe_error
from serving.runtime.pool import ModelPool
from serving.runtime.service import ModelService, close_shared_pools
from serving.server.asgi import request_from_asgi

# NOTE: imported here, not lazily: a request the Serve proxy pickles to this replica
# needs the codec module's alias of the generated classes before any method runs.
from serving.server.grpc import InferenceServicer
from serving.server.local import (
    MEMBER_MEMORY_AGE_S,
    LocalMember,
    LocalModel,
    PooledModels,
    open_pool,
)
from serving.server.ray.batching import BatchedModel
from serving.server.ray.board import BoardLink, BoardLoads, Follower, drop_board, get_board, replica_context
from serving.server.ray.routing import Forward, RoutedSets, router_config
from serving.server.rest import RestApi
from serving.settings import get_settings

log = logging.getLogger(__name__)


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
        app_name, replica = replica_context()
        self._replica = replica
        link = self._link = BoardLink(get_board(app_name), replica, app_name)
        services = [ModelService(m, self.app, settings) for m in self.app.named]
        self._followers = [Follower(s, link) for s in services]
        for follower in self._followers:
            follower.start()
        loads = BoardLoads(link, self.app)
        self._stop = threading.Event()
        self.pool: ModelPool[LocalMember] | None = None
        self.sets: PooledModels | None = None
        sets: PooledModels | RoutedSets | None = None
        if self.app.model_sets:
            self.sets = open_pool(self.app, settings, lambda service: _Member(service, link), loads)
            self.pool = self.sets.pool
            self.sets.start(self._stop)
            sets = self.sets
            if self.app.pool.route_by_model:
                sets = RoutedSets(
                    self.sets,
                    Forward(
                        app_name,
                        serve.get_replica_context().deployment,
                        max_in_flight=self.app.ingress.max_ongoing_requests // 2,
                    ),
                    replica,
                )
        self.plane = DataPlane(
            self.app,
            {s.config.name: _model_port(s) for s in services},
            loads,
            admin_token=settings.admin_token_value(),
            sets=sets,
        )
        self.rest = RestApi(self.plane)

    async def __call__(self, request: Request) -> Response:
        return _response(await self.rest.handle(request_from_asgi(request.scope, request.receive)))

    # -- forwards from other replicas (routing by model): answered here, never sent on ----
    def _member(self, name: str) -> ModelPort:
        port = self.sets.port(name) if self.sets is not None else None
        if port is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        return port

    async def routed_infer(self, name: str, request: InferRequest) -> InferResponse:
        with _logged_here():
            return await self._member(name).infer(request)

    async def routed_metadata(self, name: str, version: str | None) -> ModelMetadata:
        with _logged_here():
            return await self._member(name).metadata(version)

    async def routed_ready(self, name: str, version: str | None) -> bool:
        with _logged_here():
            return await self._member(name).ready(version)

    async def routed_load(self, name: str, timeout: float) -> bool:
        with _logged_here():
            if self.sets is None:
                raise ModelNotFound(f"model {name!r} is not served here")
            return await self.sets.load(name, timeout)

    async def routed_unload(self, name: str, replica: str) -> bool:
        """Unload ``name`` if this is ``replica`` (the router sends a call for a replica that
        has gone to any other); whether it held it."""
        with _logged_here():
            if self.sets is None or replica != self._replica:
                return False
            return await self.sets.unload(name)

    def __del__(self) -> None:
        for follower in getattr(self, "_followers", []):
            follower.stop()
        link = getattr(self, "_link", None)
        if link is not None:
            link.close()
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close()
        close_shared_pools()


class _Member:
    """A model-set member in a single-hop replica: its service, port and board follower."""

    def __init__(self, service: ModelService, link: BoardLink) -> None:
        self.name = service.config.name
        self.service = service
        self.port = _model_port(service)
        self._follower = Follower(service, link)

    def load(self) -> None:
        self._follower.start()

    def close(self) -> None:
        self._follower.stop()
        self.service.close()
        self.port.close()

    def memory_bytes(self) -> int:
        return self.service.memory_bytes(max_age_s=MEMBER_MEMORY_AGE_S)

    def nudge(self) -> None:
        self._follower.nudge()


@serve.deployment
class ModelDeployment:
    """Two-hop model replica: one model, called by :class:`Ingress` through a handle."""

    def __init__(self, model: dict[str, Any], app: dict[str, Any]) -> None:
        _replica_setup()
        config = ModelConfig.model_validate(model)
        service = ModelService(config, AppConfig.model_validate(app), get_settings())
        app_name, replica = replica_context()
        self._link = BoardLink(get_board(app_name), replica, app_name)
        self._follower = Follower(service, self._link)
        self._follower.start()
        self.port = _model_port(service)

    async def infer(self, request: InferRequest) -> InferResponse:
        with _logged_here():
            return await self.port.infer(request)

    async def metadata(self, version: str | None) -> ModelMetadata:
        with _logged_here():
            return await self.port.metadata(version)

    async def refused(self, version: str | None, status: int) -> None:
        await self.port.refused(version, status)

    async def ready(self, version: str | None) -> bool:
        return await self.port.ready(version)

    async def status(self) -> dict[str, Any]:
        return await self.port.status()

    def __del__(self) -> None:
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.stop()
        link = getattr(self, "_link", None)
        if link is not None:
            link.close()


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

    async def refused(self, version: str | None, status: int) -> None:
        await self._handle.refused.remote(version, status)

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
        app_name, replica = replica_context()
        loads = BoardLoads(BoardLink(get_board(app_name), replica, app_name), self.app)
        self.plane = DataPlane(self.app, ports, loads, admin_token=get_settings().admin_token_value())
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


def delete_app(name: str) -> None:
    """Delete a Serve app and its board, the one process of an app that ``serve.delete``
    leaves (a detached actor, so that replicas can come and go around it)."""
    serve.delete(name)
    drop_board(name)


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
    if config.model_sets and config.pool.route_by_model:
        options["request_router_config"] = router_config(config.pool.owner_rps)
    if config.layout == "single-hop":
        # NOTE: @serve.deployment turns the classes into Deployments; mypy sees classes.
        single: serve.Application = cast(Any, Server).options(name="server", **options).bind(app_dict)
        return single
    handles: dict[str, Any] = {}
    for model in config.named:
        handles[model.name] = (
            cast(Any, ModelDeployment)
            .options(**_deployment_options(model, config))
            .bind(model.model_dump(mode="json"), app_dict)
        )
    application: serve.Application = cast(Any, Ingress).options(**options).bind(app_dict, handles)
    return application
