"""A BentoML service serving iris on a v2-shaped route, as its quickstart defines a service.

Run (in its own venv): ``bentoml serve bentoml_app:Iris --port PORT`` from this folder;
``BENCH_WORKERS`` sets the service's workers.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import numpy as np
from _iris import train


@bentoml.service(workers=int(os.environ.get("BENCH_WORKERS", "1")))
class Iris:
    def __init__(self) -> None:
        self.model = train()

    @bentoml.api(route="/v2/models/iris/infer")
    def infer(
        self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        item = inputs[0]
        y = self.model.predict(np.asarray(item["data"], dtype=np.float64).reshape(item["shape"]))
        output = {"name": "predict", "shape": list(y.shape), "datatype": "INT64", "data": y.tolist()}
        return {"model_name": "iris", "outputs": [output]}
