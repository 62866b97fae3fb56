"""KServe's Python ``ModelServer`` serving iris the way its sklearnserver does.

Run (in its own venv): ``python bench/baselines/kserve_app.py HTTP_PORT GRPC_PORT WORKERS``.
"""

from __future__ import annotations

import sys
from typing import Any

from _iris import train
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import from_np_dtype, generate_uuid, get_predict_input


class Iris(Model):  # type: ignore[misc]
    """``kserve/sklearnserver``'s ``SKLearnModel.predict``, with the model trained here and its
    output named ``predict`` (the request names it; sklearnserver's would be ``output-0``)."""

    def __init__(self) -> None:
        super().__init__("iris")
        self.model: Any = None
        self.load()

    def load(self) -> bool:
        self.model = train()
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        # NOTE: kserve.utils.utils.get_predict_response, as sklearnserver calls it, but the
        # output is named "predict" (the request names it; get_predict_response says "output-0").
        y = self.model.predict(get_predict_input(payload))
        output = InferOutput(name="predict", shape=list(y.shape), datatype=from_np_dtype(y.dtype))
        output.set_data_from_numpy(y, binary_data=payload.use_binary_outputs)
        return InferResponse(
            model_name=self.name,
            infer_outputs=[output],
            response_id=payload.id if payload.id else generate_uuid(),
            use_binary_outputs=payload.use_binary_outputs,
            requested_outputs=payload.request_outputs,
        )


if __name__ == "__main__":
    http_port, grpc_port, workers = (int(a) for a in sys.argv[1:4])
    ModelServer(http_port=http_port, grpc_port=grpc_port, workers=workers).start([Iris()])
