"""Every format round-trips: save/publish to a store, pull through the cache, load, predict the same.

TensorFlow is slow to import, so its tests share this module and import it lazily.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.cache import LoaderCache
from serving.errors import InvalidRequest, UntrustedArtifact
from serving.formats import LoadPolicy, Predictor, detect_format, load_predictor
from serving.manifest import Manifest
from serving.publish import publish_path
from serving.repository import Repository
from serving.save import load as serving_load
from serving.save import save as serving_save
from serving.store.local import LocalStore

IRIS_ROW = [[5.1, 3.5, 1.4, 0.2]]
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """serving.load reads Settings: keep the developer's SERVING_* out of it."""
    for name in list(os.environ):
        if name.startswith("SERVING_"):
            monkeypatch.delenv(name)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


@pytest.fixture(scope="module")
def iris_model() -> Any:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=200).fit(x, y)


RUNS_CODE = {"torchscript", "torch-export", "savedmodel", "keras-h5"}


def load_back(store: LocalStore, tmp_path: Path, ref: str, policy: LoadPolicy | None = None) -> Predictor:
    """Resolve and fetch through a real LoaderCache, then load the verified directory."""
    repo = Repository(store)
    cache = LoaderCache(tmp_path / "cache")
    resolved, _ = cache.resolve(repo, ref)
    cached = cache.fetch(repo, resolved)
    return load_predictor(cached.path, cached.manifest, policy or LoadPolicy())


def only_input(predictor: Predictor, rows: Any) -> dict[str, np.ndarray]:
    return predictor.predict_rows(rows)


def test_iris_logistic_regression_roundtrips_through_joblib(
    iris_model: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """The seed's iris model predicts class 0 for [5.1, 3.5, 1.4, 0.2] after save -> fetch -> load."""
    manifest = serving_save(iris_model, "iris", store=local_store, alias="production", example=IRIS_ROW)
    assert manifest.format == "sklearn"
    assert manifest.inputs is not None
    assert manifest.inputs[0].shape == [-1, 4]
    assert manifest.outputs is not None
    assert [o.name for o in manifest.outputs] == ["predict", "predict_proba", "decision_function"]

    predictor = load_back(local_store, tmp_path, "iris@production")
    out = only_input(predictor, ROWS)
    assert out["predict"].tolist()[0] == 0
    np.testing.assert_array_equal(out["predict"], iris_model.predict(ROWS))
    np.testing.assert_allclose(out["predict_proba"], iris_model.predict_proba(ROWS))


def test_serving_load_resolves_fetches_and_loads(
    iris_model: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """serving.load goes from 'iris@production' to a working Predictor."""
    serving_save(iris_model, "iris", store=local_store, alias="production")
    predictor = serving_load("iris@production", store=local_store, cache_dir=tmp_path / "cache")
    assert predictor.predict_rows(IRIS_ROW)["predict"].tolist() == [0]


def test_plain_pickle_roundtrips(iris_model: Any, local_store: LocalStore, tmp_path: Path) -> None:
    """format='pickle' writes a plain pickle that loads through the restricted unpickler."""
    manifest = serving_save(iris_model, "iris-pkl", store=local_store, version="1", format="pickle")
    assert manifest.format == "pickle"
    predictor = load_back(local_store, tmp_path, "iris-pkl:1")
    np.testing.assert_array_equal(only_input(predictor, ROWS)["predict"], iris_model.predict(ROWS))


def test_pickle_file_published_from_disk_is_detected(
    iris_model: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """A .pkl published by path is detected as 'pickle' and loads."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(iris_model))
    publish_path(Repository(local_store), path, "iris-file", version="1")
    predictor = load_back(local_store, tmp_path, "iris-file:1")
    assert only_input(predictor, IRIS_ROW)["predict"].tolist() == [0]


# -- skops -----------------------------------------------------------------------------


def test_iris_roundtrips_through_skops(iris_model: Any, local_store: LocalStore, tmp_path: Path) -> None:
    """format='skops' saves the iris model without pickle; it loads and predicts the same."""
    pytest.importorskip("skops")
    manifest = serving_save(iris_model, "iris-skops", store=local_store, version="1", format="skops")
    assert manifest.format == "skops"
    assert [f.path for f in manifest.files] == ["model.skops"]
    predictor = load_back(local_store, tmp_path, "iris-skops:1")
    assert [o.name for o in predictor.outputs] == ["predict", "predict_proba", "decision_function"]
    out = only_input(predictor, ROWS)
    np.testing.assert_array_equal(out["predict"], iris_model.predict(ROWS))
    np.testing.assert_allclose(out["predict_proba"], iris_model.predict_proba(ROWS))
    np.testing.assert_allclose(out["decision_function"], iris_model.decision_function(ROWS))


def test_skops_file_published_from_disk_loads_through_serving_load(
    iris_model: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """A .skops file is detected as 'skops', passes the trust check and loads via serving.load."""
    skops_io = pytest.importorskip("skops.io")
    path = tmp_path / "iris.skops"
    skops_io.dump(iris_model, path)
    assert detect_format(path) == "skops"
    publish_path(Repository(local_store), path, "iris-file", alias="production")
    predictor = serving_load("iris-file@production", store=local_store, cache_dir=tmp_path / "cache")
    assert predictor.predict_rows(IRIS_ROW)["predict"].tolist() == [0]


def test_skops_type_loads_only_when_listed_in_trusted_globals(
    local_store: LocalStore, tmp_path: Path
) -> None:
    """A type outside skops's defaults is UntrustedArtifact naming it, and loads once trusted."""
    skops_io = pytest.importorskip("skops.io")
    import operator

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x = np.array([[0.0], [1.0]])
    model = make_pipeline(FunctionTransformer(operator.neg), LogisticRegression()).fit(x, [0, 1])
    path = tmp_path / "neg.skops"
    skops_io.dump(model, path)
    publish_path(Repository(local_store), path, "neg", version="1")
    with pytest.raises(UntrustedArtifact, match=r"'_operator\.neg'.*SERVING_TRUSTED_GLOBALS"):
        load_back(local_store, tmp_path, "neg:1")
    predictor = load_back(
        local_store, tmp_path, "neg:1", LoadPolicy(trusted_globals=frozenset({"_operator.neg"}))
    )
    assert predictor.predict_rows(x)["predict"].tolist() == [0, 1]


def test_a_skops_default_trusted_function_is_still_held_to_the_allowlist(
    local_store: LocalStore, tmp_path: Path
) -> None:
    """skops trusts numpy ufuncs by default; the exact allowlist does not, until an operator lists one."""
    skops_io = pytest.importorskip("skops.io")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x = np.array([[1.0], [2.0]])
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression()).fit(x, [0, 1])
    path = tmp_path / "log1p.skops"
    skops_io.dump(model, path)
    assert skops_io.get_untrusted_types(file=path) == []
    publish_path(Repository(local_store), path, "log1p", version="1")
    with pytest.raises(UntrustedArtifact, match=r"not on the allowlist: \['numpy.log1p'\]"):
        load_back(local_store, tmp_path, "log1p:1")
    predictor = load_back(
        local_store, tmp_path, "log1p:1", LoadPolicy(trusted_globals=frozenset({"numpy.log1p"}))
    )
    assert predictor.predict_rows(x)["predict"].tolist() == [0, 1]


# -- torch ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp() -> Any:
    torch = pytest.importorskip("torch")
    from tiny_models import TinyMLP

    torch.manual_seed(0)
    return TinyMLP(4, 3).eval()


def torch_reference(model: Any, rows: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(torch.from_numpy(rows.astype(np.float32))).numpy()


@pytest.mark.parametrize(
    ("options", "fmt"),
    [
        ({"init_kwargs": {"n_in": 4, "n_out": 3}}, "torch-state-dict"),
        ({"init_kwargs": {"n_in": 4, "n_out": 3}, "format": "safetensors"}, "safetensors"),
        ({"torchscript": True}, "torchscript"),
        ({"export": True}, "torch-export"),
    ],
)
def test_torch_module_roundtrips(
    mlp: Any, options: dict[str, Any], fmt: str, local_store: LocalStore, tmp_path: Path
) -> None:
    """A torch MLP predicts the same float32 outputs after save -> fetch -> load."""
    manifest = serving_save(mlp, "mlp", store=local_store, alias="production", example=IRIS_ROW, **options)
    assert manifest.format == fmt
    assert manifest.outputs is not None
    assert manifest.outputs[0].shape == [-1, 3]
    policy = None
    if fmt in RUNS_CODE:
        # A program, not weights: refused unless the policy allows it (a signed, opted-in version).
        with pytest.raises(UntrustedArtifact, match="runs code"):
            load_back(local_store, tmp_path, "mlp@production")
        policy = LoadPolicy(allow_unrestricted=True)
    predictor = load_back(local_store, tmp_path, "mlp@production", policy)
    out = only_input(predictor, ROWS)["output-0"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, torch_reference(mlp, ROWS), rtol=1e-5, atol=1e-6)


def test_torch_state_dict_records_class_path(mlp: Any, local_store: LocalStore) -> None:
    """The manifest names the module class and its constructor arguments."""
    manifest = serving_save(mlp, "mlp", store=local_store, init_kwargs={"n_in": 4, "n_out": 3})
    assert manifest.options["class_path"] == "tiny_models:TinyMLP"
    assert manifest.options["init_kwargs"] == {"n_in": 4, "n_out": 3}


def test_safetensors_file_published_from_disk_is_detected(
    mlp: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """A .safetensors file plus class_path/init_kwargs options loads the same weights."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file(mlp.state_dict(), str(path))
    assert detect_format(path) == "safetensors"
    options = {"class_path": "tiny_models:TinyMLP", "init_kwargs": {"n_in": 4, "n_out": 3}}
    publish_path(Repository(local_store), path, "mlp-st", version="1", options=options)
    predictor = load_back(local_store, tmp_path, "mlp-st:1")
    out = only_input(predictor, ROWS)["output-0"]
    np.testing.assert_allclose(out, torch_reference(mlp, ROWS), rtol=1e-5, atol=1e-6)


def test_torch_state_dict_without_required_init_kwargs_is_refused(mlp: Any, local_store: LocalStore) -> None:
    """A module whose constructor needs arguments cannot be saved without init_kwargs."""
    with pytest.raises(InvalidRequest, match="init_kwargs"):
        serving_save(mlp, "mlp", store=local_store)


# -- ONNX ------------------------------------------------------------------------------


def test_onnx_from_skl2onnx_roundtrips(iris_model: Any, local_store: LocalStore, tmp_path: Path) -> None:
    """An skl2onnx conversion of the iris model loads on onnxruntime with inputs from the graph."""
    pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType

    onx = skl2onnx.convert_sklearn(
        iris_model, initial_types=[("features", FloatTensorType([None, 4]))], options={"zipmap": False}
    )
    path = tmp_path / "iris.onnx"
    path.write_bytes(onx.SerializeToString())
    assert detect_format(path) == "onnx"
    publish_path(Repository(local_store), path, "iris-onnx", version="1")

    predictor = load_back(local_store, tmp_path, "iris-onnx:1")
    assert [(s.name, s.datatype, s.shape) for s in predictor.inputs] == [("features", "FP32", [-1, 4])]
    out = predictor.predict({"features": ROWS.astype(np.float32)})
    np.testing.assert_array_equal(out["label"], iris_model.predict(ROWS))
    np.testing.assert_allclose(out["probabilities"], iris_model.predict_proba(ROWS), atol=1e-5)


def test_onnx_model_proto_saves_directly(mlp: Any, local_store: LocalStore, tmp_path: Path) -> None:
    """serving.save accepts an onnx.ModelProto (here from torch.onnx.export)."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    import torch

    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        mlp,
        (torch.zeros(2, 4),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,
    )
    serving_save(onnx.load(str(path)), "mlp-onnx", store=local_store, version="1")
    predictor = load_back(local_store, tmp_path, "mlp-onnx:1")
    out = predictor.predict({"x": ROWS.astype(np.float32)})["y"]
    np.testing.assert_allclose(out, torch_reference(mlp, ROWS), rtol=1e-5, atol=1e-6)


# -- Keras / TensorFlow (one module: TF's import is slow) ---------------------------


@pytest.fixture(scope="module")
def keras_model() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,), name="features"), keras.layers.Dense(3, activation="softmax")]
    )
    return model


@pytest.mark.slow
def test_keras_model_roundtrips(keras_model: Any, local_store: LocalStore, tmp_path: Path) -> None:
    """A .keras model loads in safe mode and predicts the same."""
    manifest = serving_save(keras_model, "k", store=local_store, alias="production", example=IRIS_ROW)
    assert manifest.format == "keras"
    assert manifest.inputs is not None
    assert manifest.inputs[0].name == "features"
    predictor = load_back(local_store, tmp_path, "k@production")
    expected = np.asarray(keras_model(ROWS.astype(np.float32)))
    np.testing.assert_allclose(only_input(predictor, ROWS)["output-0"], expected, rtol=1e-5)


@pytest.mark.slow
def test_legacy_h5_is_refused_unless_the_policy_allows_it(
    keras_model: Any, local_store: LocalStore, tmp_path: Path
) -> None:
    """A .h5 model is UntrustedArtifact by default and loads with allow_legacy_h5."""
    path = tmp_path / "model.h5"
    keras_model.save(str(path))
    assert detect_format(path) == "keras-h5"
    publish_path(Repository(local_store), path, "h5", version="1")
    with pytest.raises(UntrustedArtifact, match="runs code"):
        load_back(local_store, tmp_path, "h5:1")
    with pytest.raises(UntrustedArtifact, match="SERVING_ALLOW_LEGACY_H5"):
        load_back(local_store, tmp_path, "h5:1", LoadPolicy(allow_unrestricted=True))
    predictor = load_back(
        local_store, tmp_path, "h5:1", LoadPolicy(allow_legacy_h5=True, allow_unrestricted=True)
    )
    expected = np.asarray(keras_model(ROWS.astype(np.float32)))
    np.testing.assert_allclose(only_input(predictor, ROWS)["output-0"], expected, rtol=1e-5)


@pytest.mark.slow
def test_tf_module_savedmodel_roundtrips(local_store: LocalStore, tmp_path: Path) -> None:
    """A tf.Module with a tf.function signature serves through serving_default."""
    tf = pytest.importorskip("tensorflow")

    class Doubler(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable([[2.0], [1.0], [0.5], [0.25]])

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def __call__(self, x: Any) -> Any:
            return {"y": tf.matmul(x, self.w)}

    manifest = serving_save(Doubler(), "sm", store=local_store, version="1")
    assert manifest.format == "savedmodel"
    assert [(s.name, s.shape) for s in manifest.inputs or []] == [("x", [-1, 4])]
    with pytest.raises(UntrustedArtifact, match="runs code"):
        load_back(local_store, tmp_path, "sm:1")
    predictor = load_back(local_store, tmp_path, "sm:1", LoadPolicy(allow_unrestricted=True))
    assert [o.name for o in predictor.outputs] == ["y"]
    out = predictor.predict({"x": ROWS.astype(np.float32)})["y"]
    np.testing.assert_allclose(out[:, 0], ROWS @ np.array([2.0, 1.0, 0.5, 0.25]), rtol=1e-5)


def test_loaded_manifest_round_trips_format_field(local_store: LocalStore, iris_model: Any) -> None:
    """The manifest read back from the store names the format the loader uses."""
    serving_save(iris_model, "iris", store=local_store, version="3")
    manifest, _ = Repository(local_store).manifest("iris", "3")
    assert isinstance(manifest, Manifest)
    assert manifest.format == "sklearn"
