"""NVIDIA PyTriton: its bundled Triton server with a Python-backend model, as its docs bind one.

Run (in its own venv): ``python bench/baselines/pytriton_app.py HTTP_PORT GRPC_PORT METRICS_PORT INSTANCES``.
Under pyenv the Python backend needs the interpreter's ``libpython`` first on
``LD_LIBRARY_PATH`` (the bench sets it).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from _iris import train
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

MAX_ROWS = 16384
"""The largest request (rows) Triton admits: the bench sends 10,000."""


def make_infer(model: Any) -> Any:
    def infer(requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [{"predict": model.predict(r["input-0"]).astype(np.int64).reshape(-1, 1)} for r in requests]

    return infer


if __name__ == "__main__":
    http_port, grpc_port, metrics_port, instances = (int(a) for a in sys.argv[1:5])
    model = train()
    config = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="iris",
            infer_func=[make_infer(model) for _ in range(instances)],
            inputs=[Tensor(name="input-0", dtype=np.float64, shape=(4,))],
            outputs=[Tensor(name="predict", dtype=np.int64, shape=(1,))],
            config=ModelConfig(max_batch_size=MAX_ROWS),
            strict=False,
        )
        triton.serve()
