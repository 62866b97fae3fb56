"""A bare Starlette app calling ``predict``: the ceiling for a Python HTTP server here.

Run: ``python -m bench.baselines.starlette_app MODEL.joblib PORT`` (uvicorn, one worker).
"""

from __future__ import annotations

import sys
from typing import Any

import joblib
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def make_app(model: Any) -> Starlette:
    async def infer(request: Request) -> Response:
        payload = orjson.loads(await request.body())
        item = payload["inputs"][0]
        x = np.asarray(item["data"], dtype=np.float64).reshape(item["shape"])
        y = model.predict(x)
        out = {
            "model_name": "iris",
            "outputs": [{"name": "predict", "shape": list(y.shape), "datatype": "INT64", "data": y}],
        }
        return Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    async def predict_v1(request: Request) -> Response:
        payload = orjson.loads(await request.body())
        y = model.predict(np.asarray(payload["instances"], dtype=np.float64))
        return Response(
            orjson.dumps({"predictions": y}, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    async def ready(request: Request) -> Response:
        return Response(b'{"ready": true}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/v2/models/iris/infer", infer, methods=["POST"]),
            Route("/v1/models/iris:predict", predict_v1, methods=["POST"]),
            Route("/v2/health/ready", ready),
        ]
    )


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        make_app(joblib.load(sys.argv[1])), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )
