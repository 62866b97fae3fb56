"""Ray Serve's documented model multiplexing, for the many-models comparison (``bench/multiplexed.py``).

As Ray's guide shows it ("Model Multiplexing"), with a downstream deployment because
multiplexing on the ingress is refused under direct ingress or HAProxy (ray-project/ray#64045):
- ``Ingress`` takes ``POST /v2/models/{name}/infer`` (the same 1-row v2 body as ours) and calls
  ``Models`` through a handle with ``.options(multiplexed_model_id=name)``, so Ray's router
  prefers a replica that holds the model;
- ``Models.get_model`` is the ``@serve.multiplexed`` loader: it reads the model's joblib file
  from a plain folder (the store's files, no digest check and no isolation) on a thread, and
  Ray keeps at most ``max_models`` per replica, least recently used first. Ray bounds the count,
  not the bytes: the caller sizes ``max_models`` so that that many of the largest model fit.

A request that waited for its model's load says so as ours does, ``parameters.load_wait_ms``,
so the benchmark splits warm and cold requests the same way for both.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse


def build(args: dict[str, Any]) -> Any:
    root = Path(args["root"])
    max_models = int(args["max_models"])

    class _Loaded:
        """A loaded model; Ray calls ``__del__`` when it evicts it, which marks it unloaded."""

        def __init__(self, model_id: str, model: Any, loaded: dict[str, int]) -> None:
            self.model_id, self.model, self.loaded = model_id, model, loaded
            loaded[model_id] = id(self)

        def __del__(self) -> None:
            # NOTE: Ray calls it at eviction and Python again at collection; a reload in between
            # is another object, which this one must not mark unloaded.
            if self.loaded.get(self.model_id) == id(self):
                del self.loaded[self.model_id]

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    class Models:
        def __init__(self) -> None:
            self.loaded: dict[str, int] = {}

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> _Loaded:
            path = root / model_id / "versions" / "1" / f"{model_id}.joblib"
            return _Loaded(model_id, await asyncio.to_thread(joblib.load, path), self.loaded)

        async def __call__(self, rows: list[list[float]]) -> tuple[list[Any], float | None]:
            model_id = serve.get_multiplexed_model_id()
            cold = model_id not in self.loaded
            started = time.perf_counter()
            loaded = await self.get_model(model_id)
            waited = (time.perf_counter() - started) * 1000 if cold else None
            return loaded.model.predict(np.asarray(rows, dtype=np.float64)).tolist(), waited

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    class Ingress:
        def __init__(self, models: DeploymentHandle) -> None:
            self.models = models

        async def __call__(self, request: Request) -> JSONResponse:
            parts = request.url.path.strip("/").split("/")
            if parts == ["ready"]:
                return JSONResponse({"ready": True})
            if len(parts) != 4 or parts[:2] != ["v2", "models"] or parts[3] != "infer":
                return JSONResponse({"error": "not found"}, status_code=404)
            body = await request.json()
            rows = body["inputs"][0]["data"]
            handle = self.models.options(multiplexed_model_id=parts[2])
            predictions, waited = await handle.remote(rows)
            reply: dict[str, Any] = {
                "model_name": parts[2],
                "outputs": [
                    {"name": "predict", "datatype": "INT64", "shape": [len(predictions)], "data": predictions}
                ],
            }
            if waited is not None:
                reply["parameters"] = {"load_wait_ms": round(waited, 2)}
            return JSONResponse(reply)

    return Ingress.bind(Models.bind())
