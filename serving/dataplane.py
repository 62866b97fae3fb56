"""The data plane: every operation of the inference protocol, once, for every transport.

REST (:mod:`serving.server.rest`) and gRPC (:mod:`serving.server.grpc`) decode
their wire format into the types of :mod:`serving.protocol.types`, call one
method here, and encode what it returns; an error is a
:class:`serving.errors.ServingError` raised to them, which each maps to its own
status (HTTP status, gRPC code) with the same message::

    REST codec ─┐                               ┌─ ModelPort per model (this process,
                ├─ DataPlane ── InferRequest ───┤  another Ray replica): lease, predict
    gRPC codec ─┘      │                        └─ LoadPort: alias checks, replica reports
                       └── admin token, load coordination, the repository index

What lives here, once: model lookup, the admin token of ``load``, and load
coordination (at most one forced check in flight per model, one wait shared by
every request for it).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from serving.config import AppConfig
from serving.errors import Forbidden, InvalidRequest, ModelNotFound, ServingError, Unauthorized
from serving.protocol.types import InferRequest, InferResponse, ModelMetadata, ServerMetadata, check_model
from serving.runtime.service import index_entry

LOAD_TIMEOUT_S = 30.0
"""How long a load request waits for every replica's check before answering 'not yet converged'."""

EXTENSIONS = ["model_repository", "binary_tensor_data"]
"""What server metadata lists under ``extensions`` (Triton's names)."""


class ModelPort(Protocol):
    """One model, wherever it runs (this process, another Ray replica)."""

    async def infer(self, request: InferRequest) -> InferResponse: ...

    async def metadata(self, version: str | None) -> ModelMetadata: ...

    async def refused(self, version: str | None, status: int) -> None:
        """Count a request for this model that its transport refused before it reached a version."""
        ...

    async def ready(self, version: str | None) -> bool: ...

    async def status(self) -> dict[str, Any]: ...


class LoadPort(Protocol):
    """Load requests and what each replica reports, for every model."""

    async def request(self, model: str) -> int:
        """Ask every replica of ``model`` to check its alias now; returns the request's generation."""
        ...

    async def wait_done(self, model: str, generation: int, timeout: float) -> bool:
        """Wait until every replica of ``model`` has finished the check of ``generation``."""
        ...

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per model, per replica id: its status (live and target version, generation, ...)."""
        ...


class ModelSets(Protocol):
    """The members of model sets (``prefix``): models loaded on demand under a memory budget."""

    def port(self, name: str) -> ModelPort | None:
        """The port of ``name`` if a model set serves it (loaded or not); None otherwise."""
        ...

    async def load(self, name: str, timeout: float) -> bool:
        """Load ``name`` if it is not loaded and check its alias now; whether the check finished."""
        ...

    async def unload(self, name: str) -> bool:
        """Unload ``name``; whether it was loaded."""
        ...

    async def snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per loaded member, per replica id: its status."""
        ...


class DataPlane:
    """Every protocol operation over model ports and a load port.

    Example::

        plane = DataPlane(config, {"iris": LocalModel(service)}, LocalLoads(...))
        response = await plane.infer(InferRequest(model="iris", inputs={"x": rows}))

    Args:
        config: the app config (the models the index lists).
        models: a port per served model name.
        loads: load requests and replica snapshots.
        admin_token: when set, :meth:`load` requires it as a bearer token.
        sets: the members of the config's model sets, if it has any.
    """

    def __init__(
        self,
        config: AppConfig,
        models: Mapping[str, ModelPort],
        loads: LoadPort,
        *,
        admin_token: str | None = None,
        load_timeout_s: float = LOAD_TIMEOUT_S,
        sets: ModelSets | None = None,
    ) -> None:
        self.config = config
        self.sets = sets
        self.models = dict(models)
        self.loads = loads
        self._admin_token = admin_token.encode() if admin_token else None
        self._load_timeout_s = load_timeout_s
        self._waits: dict[tuple[str, int], asyncio.Task[bool]] = {}

    def model(self, name: str, version: str | None = None) -> ModelPort:
        """The port of a served model, with the model name (and version, if given) checked.

        Raises:
            InvalidReference: ``name`` or ``version`` is not a plain name (``iris/versions/7``).
            ModelNotFound: no such model is served here.
        """
        port = self.models.get(name)
        # NOTE: a configured name was checked once, at start; anything else is checked here.
        if port is None or version is not None:
            check_model(name, version)
        if port is None and self.sets is not None:
            port = self.sets.port(name)
        if port is None:
            served = [*sorted(self.models), *(m.ref for m in self.config.model_sets)]
            raise ModelNotFound(f"model {name!r} is not served here; served: {', '.join(served)}")
        return port

    # -- health and metadata ---------------------------------------------------------
    async def live(self) -> bool:
        return True

    async def ready(self) -> bool:
        """Whether every named model has a version to answer with (model sets load on demand)."""
        return all(await asyncio.gather(*(port.ready(None) for port in self.models.values())))

    def server_metadata(self) -> ServerMetadata:
        from serving import __version__

        return ServerMetadata("serving", __version__, list(EXTENSIONS))

    async def model_metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        return await self.model(model, version).metadata(version)

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        return await self.model(model, version).ready(version)

    # -- inference --------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """Answer one request with the model it names (its checks ran when it was built)."""
        return await self.model(request.model).infer(request)

    async def infer_wire(
        self, model: str, version: str | None, decode: Callable[[], InferRequest]
    ) -> InferResponse:
        """Decode a transport's request for ``model`` and answer it.

        A request that does not decode (malformed JSON, a bad shape) is counted in
        the model's request metrics, as one that reached it is, and its error raised.
        """
        port = self.model(model, version)
        try:
            request = decode()
        except ServingError as exc:
            await port.refused(version, exc.status_code)
            raise
        return await port.infer(request)

    # -- repository --------------------------------------------------------------------
    async def index(self) -> list[dict[str, Any]]:
        """One row per configured model: target, live versions per replica, convergence."""
        snap = await self.loads.snapshot()
        rows = [index_entry(cfg, snap.get(cfg.name, {})) for cfg in self.config.named]
        if self.sets is not None:
            for name, replicas in sorted((await self.sets.snapshot()).items()):
                model_set = self.config.set_for(name)
                # NOTE: a member is listed while some replica holds it; the board keeps an
                # empty entry for one every replica unloaded.
                if model_set is not None and replicas:
                    rows.append({**index_entry(model_set.member(name), replicas), "set": model_set.prefix})
        return rows

    def authorize(self, authorization: str | None) -> None:
        """Check an ``Authorization: Bearer <token>`` value against the admin token, if one is set.

        Raises:
            Unauthorized: no bearer token was given.
            Forbidden: the token is not the admin token.
        """
        if self._admin_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this route needs 'Authorization: Bearer <admin token>'")
        if not hmac.compare_digest(token.strip().encode(), self._admin_token):
            raise Forbidden("the bearer token is not the admin token")

    async def load(self, model: str, authorization: str | None) -> tuple[dict[str, Any], bool]:
        """Check ``model``'s alias now on every replica; returns its index row and whether all are done.

        Concurrent load requests that got the same generation share one wait, so a
        flood of them holds one waiter per model, not one per request.
        """
        self.authorize(authorization)
        self.model(model)
        if model not in self.models and self.sets is not None:
            done = await self.sets.load(model, self._load_timeout_s)
            return await self._row(model), done
        generation = await self.loads.request(model)
        key = (model, generation)
        wait = self._waits.get(key)
        if wait is None:
            wait = asyncio.ensure_future(self.loads.wait_done(model, generation, self._load_timeout_s))
            self._waits[key] = wait
            wait.add_done_callback(lambda _: self._waits.pop(key, None))
        done = await asyncio.shield(wait)
        return await self._row(model), done

    async def _row(self, model: str) -> dict[str, Any]:
        return next((e for e in await self.index() if e["name"] == model), {"name": model, "loaded": False})

    async def unload(self, model: str, authorization: str | None) -> dict[str, Any]:
        """Unload a model-set member from this process (its next request loads it again).

        Raises:
            InvalidRequest: ``model`` is a named model, loaded for as long as the server runs.
        """
        self.authorize(authorization)
        self.model(model)
        if model in self.models or self.sets is None:
            raise InvalidRequest(
                f"model {model!r} is named in the config and stays loaded; only members of model sets unload"
            )
        return {"name": model, "unloaded": await self.sets.unload(model)}
