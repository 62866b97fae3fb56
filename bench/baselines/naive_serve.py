"""The seed-style Ray Serve deployment: ``joblib.load`` in ``__init__``, a FastAPI ingress.

No store, no cache, no alias, no metrics: what a first Ray Serve app looks like.
"""

# NOTE: no `from __future__ import annotations`: FastAPI reads the body type at runtime.
from typing import Any

import joblib
import numpy as np
from fastapi import FastAPI
from ray import serve

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class NaiveModel:
    def __init__(self, path: str) -> None:
        self.model = joblib.load(path)

    @api.post("/v2/models/iris/infer")
    async def infer(self, payload: dict[str, Any]) -> dict[str, Any]:
        item = payload["inputs"][0]
        x = np.asarray(item["data"], dtype=np.float64).reshape(item["shape"])
        y = self.model.predict(x)
        return {
            "model_name": "iris",
            "outputs": [{"name": "predict", "shape": list(y.shape), "datatype": "INT64", "data": y.tolist()}],
        }

    @api.post("/v1/models/iris:predict")
    async def predict_v1(self, payload: dict[str, Any]) -> dict[str, Any]:
        y = self.model.predict(np.asarray(payload["instances"], dtype=np.float64))
        return {"predictions": y.tolist()}


def build(path: str) -> Any:
    return NaiveModel.bind(path)
