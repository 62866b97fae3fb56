"""LitServe serving iris on a v2-shaped route, as its README's ``LitAPI`` example does.

Run (in its own venv): ``python bench/baselines/litserve_app.py PORT WORKERS``.
"""

import sys
from typing import Any

import litserve as ls
import numpy as np
from _iris import train


class Iris(ls.LitAPI):  # type: ignore[misc]
    def setup(self, device: str) -> None:
        self.model = train()

    def decode_request(self, request: dict[str, Any]) -> np.ndarray:
        item = request["inputs"][0]
        return np.asarray(item["data"], dtype=np.float64).reshape(item["shape"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)

    def encode_response(self, y: np.ndarray) -> dict[str, Any]:
        output = {"name": "predict", "shape": list(y.shape), "datatype": "INT64", "data": y.tolist()}
        return {"model_name": "iris", "outputs": [output]}


if __name__ == "__main__":
    port, workers = int(sys.argv[1]), int(sys.argv[2])
    api = Iris(api_path="/v2/models/iris/infer")
    ls.LitServer(api, accelerator="cpu", workers_per_device=workers).run(
        port=port, generate_client_file=False
    )
