"""A request that names its outputs makes the predictor compute only those, where it can."""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving.formats.pickled import EstimatorPredictor
from serving.manifest import TensorSpec

X, Y = load_iris(return_X_y=True)
INPUT = [TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]


class Counting(LogisticRegression):
    """LogisticRegression that counts calls of each prediction method."""

    calls: dict[str, int]

    def _count(self, name: str) -> None:
        self.__dict__.setdefault("calls", {}).setdefault(name, 0)
        self.calls[name] += 1

    def predict(self, X: Any) -> Any:
        self._count("predict")
        return super().predict(X)

    def predict_proba(self, X: Any) -> Any:
        self._count("predict_proba")
        return super().predict_proba(X)

    def decision_function(self, X: Any) -> Any:
        self._count("decision_function")
        return super().decision_function(X)


def _predictor() -> tuple[EstimatorPredictor, Counting]:
    model = Counting(max_iter=500).fit(X, Y)
    return EstimatorPredictor(model, INPUT), model


def test_only_the_requested_method_runs() -> None:
    predictor, model = _predictor()
    out = predictor.predict_only({"input-0": X[:2]}, ["predict_proba"])
    assert set(out) == {"predict_proba"}
    # NOTE: LogisticRegression.predict_proba calls decision_function itself; predict never ran.
    assert model.calls == {"predict_proba": 1, "decision_function": 1}
    np.testing.assert_allclose(out["predict_proba"], model.predict_proba(X[:2]))


def test_every_declared_output_without_a_request_and_for_an_unknown_name() -> None:
    """An unknown name computes everything, so the codec can list what the model produces."""
    predictor, _ = _predictor()
    every = {"predict", "predict_proba", "decision_function"}
    assert set(predictor.predict({"input-0": X[:1]})) == every
    assert set(predictor.predict_only({"input-0": X[:1]}, ["predict", "nope"])) == every


def test_the_v1_prediction_is_predict_even_when_the_manifest_lists_it_later() -> None:
    model = LogisticRegression(max_iter=500).fit(X, Y)
    outputs = [
        TensorSpec(name="predict_proba", datatype="FP64", shape=[-1, 3]),
        TensorSpec(name="predict", datatype="INT64", shape=[-1]),
    ]
    assert EstimatorPredictor(model, INPUT, outputs).primary_output == "predict"


def test_onnx_fetches_only_the_requested_output() -> None:
    """onnxruntime runs the subgraph of the fetched output alone."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["relu"]), helper.make_node("Neg", ["x"], ["neg"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [
            helper.make_tensor_value_info("relu", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("neg", TensorProto.FLOAT, [None, 2]),
        ],
    )
    import onnxruntime

    from serving.formats.onnx_runtime import OnnxPredictor
    from serving.manifest import Manifest

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    manifest = Manifest.model_validate({"name": "two", "version": "1", "format": "onnx", "files": []})
    predictor = OnnxPredictor(session, manifest)
    x = np.array([[-1.0, 2.0]], dtype=np.float32)
    assert set(predictor.predict({"x": x})) == {"relu", "neg"}
    out = predictor.predict_only({"x": x}, ["neg"])
    assert set(out) == {"neg"}
    np.testing.assert_allclose(out["neg"], -x)
