"""``serving convert NAME:VERSION --to onnx``: real estimators and a torch module, converted in a
model worker, checked against the source, published with their lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tiny_models import TinyMLP

from serving.cache import LoaderCache
from serving.convert import ConversionRefused, convert, quantize
from serving.errors import InvalidRequest
from serving.formats import load_predictor
from serving.formats.base import LoadPolicy
from serving.manifest import ModelRef
from serving.repository import Repository
from serving.save import save
from serving.settings import Settings
from serving.store.local import LocalStore

X, Y = load_iris(return_X_y=True)
ROWS = np.random.default_rng(0).normal(X.mean(0), X.std(0), size=(500, 4))


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = Repository(LocalStore(str(root / "store")))
        self.cache = LoaderCache(root / "cache", max_bytes=1 << 30)
        self.settings = Settings(store=str(root / "store"), cache_dir=root / "cache")

    def convert(self, ref: str, **kwargs: Any) -> Any:
        return convert(self.repo, self.cache, self.settings, ref, **kwargs)

    def predict(self, name: str, version: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        resolved = self.repo.resolve(ModelRef.parse(f"{name}:{version}"))
        cached = self.cache.fetch(self.repo, resolved)
        predictor = load_predictor(cached.path, cached.manifest, LoadPolicy())
        try:
            return predictor.predict({predictor.inputs[0].name: rows})
        finally:
            predictor.close()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


SKLEARN = {
    "logistic": lambda: LogisticRegression(max_iter=1000).fit(X, Y),
    "forest": lambda: RandomForestClassifier(n_estimators=15, random_state=0).fit(X, Y),
    "scaled-pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, Y),
    "column-transformer": lambda: make_pipeline(
        ColumnTransformer([("scaled", StandardScaler(), [0, 1]), ("kept", "passthrough", [2, 3])]),
        LogisticRegression(max_iter=1000),
    ).fit(X, Y),
    "regression": lambda: LinearRegression().fit(X[:, :3], X[:, 3]),
}


@pytest.mark.parametrize("kind", sorted(SKLEARN))
def test_a_scikit_learn_version_converts_and_answers_as_the_source(env: Env, kind: str) -> None:
    model = SKLEARN[kind]()
    width = 3 if kind == "regression" else 4
    source = save(model, "m", store=env.repo, example=X[:2, :width].tolist())
    published, derived = env.convert("m:1", validation=ROWS[:, :width])
    assert (published.version, published.format) == ("2", "onnx")
    lineage = published.metadata["derived_from"]
    assert lineage["version"] == source.version == "1"
    assert lineage["converter"] == derived.converter == "skl2onnx"
    assert lineage["rows_checked"] == 502
    assert 0 <= lineage["max_error"] <= lineage["tolerance"] == 1e-4
    # NOTE: the same input and output names as the source, so a client sees no difference
    assert [s.name for s in published.inputs or []] == [s.name for s in source.inputs or []]
    converted = env.predict("m", "2", ROWS[:, :width])
    np.testing.assert_array_equal(converted["predict"].shape, model.predict(ROWS[:, :width]).shape)
    if kind == "regression":
        np.testing.assert_allclose(converted["predict"], model.predict(ROWS[:, :3]), atol=1e-4)
        return
    np.testing.assert_array_equal(converted["predict"], model.predict(ROWS))
    np.testing.assert_allclose(converted["predict_proba"], model.predict_proba(ROWS), atol=1e-4)


def test_a_torch_module_converts_and_answers_within_the_tolerance(env: Env) -> None:
    torch.manual_seed(0)
    module = TinyMLP(4, 3, hidden=16).eval()
    save(
        module,
        "mlp",
        store=env.repo,
        example=X[:2].astype(np.float32).tolist(),
        init_kwargs={"n_in": 4, "n_out": 3, "hidden": 16},
    )
    published, derived = env.convert("mlp:1", validation=ROWS.astype(np.float32), tolerance=1e-5)
    assert derived.converter == "torch.onnx.export"
    assert published.metadata["derived_from"]["max_error"] <= 1e-5
    got = env.predict("mlp", "2", ROWS.astype(np.float32))
    with torch.no_grad():
        want = module(torch.from_numpy(ROWS.astype(np.float32))).numpy()
    np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-5)


def test_a_model_with_no_converter_is_refused_and_nothing_is_published(env: Env) -> None:
    save(NearestCentroid().fit(X, Y), "centroid", store=env.repo, example=X[:2].tolist())
    with pytest.raises(InvalidRequest, match="skl2onnx cannot convert NearestCentroid"):
        env.convert("centroid:1")
    assert env.repo.list_versions("centroid") == ["1"]


def test_scores_past_the_tolerance_are_refused_and_nothing_is_published(env: Env) -> None:
    """A random forest's ONNX probabilities are float32: about 5e-8 off, over a tolerance of 0."""
    save(SKLEARN["forest"](), "forest", store=env.repo, example=X[:2].tolist())
    with pytest.raises(
        ConversionRefused, match=r"'predict_proba' differs by up to .* over the tolerance of 0"
    ):
        env.convert("forest:1", validation=ROWS, tolerance=0.0)
    assert env.repo.list_versions("forest") == ["1"]


def test_an_onnx_version_or_one_without_an_example_is_refused(env: Env, tmp_path: Path) -> None:
    save(LogisticRegression(max_iter=1000).fit(X, Y), "bare", store=env.repo)
    with pytest.raises(InvalidRequest, match="no example input"):
        env.convert("bare:1")
    save(LogisticRegression(max_iter=1000).fit(X, Y), "iris", store=env.repo, example=X[:2].tolist())
    env.convert("iris:1")
    with pytest.raises(InvalidRequest, match="already ONNX"):
        env.convert("iris:2")


def test_the_cli_converts_with_validation_data_and_shows_the_lineage(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SERVING_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cli-cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    save(SKLEARN["scaled-pipeline"](), "iris", store=env.repo, example=X[:2].tolist())
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,c,d\n" + "\n".join(",".join(str(v) for v in row) for row in ROWS[:50]) + "\n")

    def run(*argv: str) -> tuple[int, str, str]:
        return run_cli(capsys, *argv)

    code, out, err = run(
        "--json", "convert", "iris:1", "--to", "onnx", "--validation-data", str(rows), "--alias", "onnx"
    )
    assert code == 0, err
    reply = json.loads(out)
    assert (reply["version"], reply["format"], reply["alias"]) == ("2", "onnx", "onnx")
    assert reply["derived_from"]["rows_checked"] == 52
    assert env.repo.get_alias("iris", "onnx").version == "2"

    code, out, _ = run("--json", "versions", "iris")
    assert code == 0
    listed = {v["version"]: v for v in json.loads(out)["versions"]}
    assert listed["2"]["derived_from"]["version"] == "1"

    code, _, err = run("convert", "iris:1", "--to", "onnx", "--validation-data", str(tmp_path / "none.csv"))
    assert code != 0
    assert err.count("\n") == 1
    assert "validation data" in err


def test_a_derived_version_is_served_as_any_version_and_shows_its_lineage(env: Env) -> None:
    """Served through the alias in a model worker, with ``derived_from`` in its OIP metadata."""
    from serving.config import AppConfig
    from serving.protocol.types import InferRequest
    from serving.repository import SetTarget
    from serving.runtime.service import ModelService

    model = SKLEARN["scaled-pipeline"]()
    save(model, "iris", store=env.repo, example=X[:2].tolist())
    env.convert("iris:1")
    env.repo.move_alias("iris", "production", SetTarget("2"))
    app = AppConfig.model_validate(
        {"store": str(env.root / "store"), "models": [{"name": "iris"}], "cache_dir": str(env.root / "cache")}
    )
    service = ModelService(app.models[0], app, env.settings)
    try:
        service.start()
        reply = service.infer(InferRequest("iris", {"input-0": ROWS[:20]}))
        assert reply.version == "2"
        np.testing.assert_array_equal(reply.outputs["predict"], model.predict(ROWS[:20]))
        meta = service.metadata()
        assert meta.platform == "onnx"
        assert meta.parameters["derived_from"]["version"] == "1"
        assert meta.parameters["derived_from"]["converter"] == "skl2onnx"
    finally:
        service.close()


def test_a_keras_model_converts_through_tf2onnx_and_answers_within_the_tolerance(env: Env) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )
    save(model, "dense", store=env.repo, example=X[:2].astype(np.float32).tolist())
    published, derived = env.convert("dense:1", validation=ROWS.astype(np.float32), tolerance=1e-5)
    assert derived.converter == "tf2onnx"
    assert published.metadata["derived_from"]["rows_checked"] == 502
    got = env.predict("dense", "2", ROWS.astype(np.float32))
    want = model(ROWS.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-5)


# -- quantization ---------------------------------------------------------------------------
def _onnx_mlp(env: Env, name: str, *, trained: bool) -> None:
    """A torch MLP 4-256-3 published and converted to ONNX (version 2)."""
    torch.manual_seed(0)
    module = TinyMLP(4, 3, hidden=256)
    if trained:
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        features, labels = torch.tensor(X, dtype=torch.float32), torch.tensor(Y)
        for _ in range(200):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(features), labels).backward()
            optimizer.step()
    save(
        module.eval(),
        name,
        store=env.repo,
        example=X[:2].astype(np.float32).tolist(),
        init_kwargs={"n_in": 4, "n_out": 3, "hidden": 256},
    )
    env.convert(f"{name}:1", tolerance=1e-4)


@pytest.mark.parametrize("how", ["int8", "fp16"])
def test_a_quantized_onnx_mlp_within_its_accuracy_drop_is_published_with_its_figures(
    env: Env, how: str
) -> None:
    _onnx_mlp(env, "mlp", trained=True)
    published, _ = quantize(
        env.repo,
        env.cache,
        env.settings,
        "mlp:2",
        how,
        validation=X.astype(np.float32),
        max_accuracy_drop=0.02,
    )
    figures = published.metadata["derived_from"]
    assert (published.version, figures["version"], figures["quantization"]) == ("3", "2", how)
    assert figures["accuracy_drop"] <= 0.02
    assert figures["rows_checked"] == 152
    # NOTE: int8 stores a quarter of each weight's bytes, fp16 half, plus the graph's own
    assert 0 < figures["size_ratio"] < (0.7 if how == "int8" else 0.75)
    assert figures["latency_ratio"] > 0
    got = env.predict("mlp", "3", X.astype(np.float32))
    want = env.predict("mlp", "2", X.astype(np.float32))
    agree = (next(iter(got.values())).argmax(1) == next(iter(want.values())).argmax(1)).mean()
    assert agree >= 0.98


def test_a_quantization_that_changes_labels_past_the_limit_is_refused(env: Env) -> None:
    """An untrained MLP's classes are nearly tied: int8 weights flip several percent of its labels."""
    _onnx_mlp(env, "tied", trained=False)
    rows = np.random.default_rng(1).normal(size=(2000, 4)).astype(np.float32)
    with pytest.raises(ConversionRefused, match=r"labels changed on \d+ of 2002 rows"):
        quantize(env.repo, env.cache, env.settings, "tied:2", "int8", validation=rows, max_accuracy_drop=0.0)
    assert env.repo.list_versions("tied") == ["1", "2"]


def test_only_onnx_versions_quantize(env: Env) -> None:
    save(LogisticRegression(max_iter=1000).fit(X, Y), "iris", store=env.repo, example=X[:2].tolist())
    with pytest.raises(InvalidRequest, match="only ONNX versions quantize"):
        quantize(env.repo, env.cache, env.settings, "iris:1", "int8")


# -- cases an attacker found: each was published wrong, crashed, or was refused wrongly ------
@pytest.mark.parametrize("module", ["Gate", "RowLoop"])
def test_a_trace_that_kept_the_examples_branch_or_batch_size_is_refused(env: Env, module: str) -> None:
    import tiny_models

    save(
        getattr(tiny_models, module)(),
        module.lower(),
        store=env.repo,
        example=X[:2].astype(np.float32).tolist(),
    )
    with pytest.raises(InvalidRequest):
        env.convert(f"{module.lower()}:1")
    assert env.repo.list_versions(module.lower()) == ["1"]


@pytest.mark.parametrize(
    "kind",
    ["svc-without-probabilities", "linear-svc", "float-labels"],
)
def test_classifiers_without_probabilities_or_with_float_labels_convert(env: Env, kind: str) -> None:
    from sklearn.svm import SVC, LinearSVC

    model = {
        "svc-without-probabilities": lambda: SVC().fit(X, Y),
        "linear-svc": lambda: LinearSVC().fit(X, Y),
        "float-labels": lambda: LogisticRegression(max_iter=1000).fit(X, Y.astype(np.float64)),
    }[kind]()
    save(model, "m", store=env.repo, example=X[:2].tolist())
    published, _ = env.convert("m:1", validation=ROWS)
    assert "predict_proba" not in {o.name for o in published.outputs or []} or hasattr(model, "predict_proba")
    np.testing.assert_array_equal(env.predict("m", "2", ROWS)["predict"], model.predict(ROWS))


def test_validation_rows_with_nan_and_an_example_that_does_not_fit_are_refused(
    env: Env, tmp_path: Path
) -> None:
    from serving.convert import read_validation_data

    rows = tmp_path / "rows.csv"
    rows.write_text("nan,3,1,0\n5.9,3,1,0\n")
    with pytest.raises(InvalidRequest, match="NaN or infinite"):
        read_validation_data(rows)
    import joblib

    from serving.publish import publish_path

    joblib.dump(LogisticRegression(max_iter=1000).fit(X, Y), tmp_path / "lr.joblib")
    publish_path(env.repo, tmp_path / "lr.joblib", "narrow", format="sklearn", example=X[:2, :3].tolist())
    with pytest.raises(InvalidRequest, match="the manifest's example does not fit narrow:1"):
        env.convert("narrow:1")


def test_lineage_cannot_be_set_by_hand(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SERVING_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    path = tmp_path / "lr.joblib"
    import joblib

    joblib.dump(LogisticRegression(max_iter=1000).fit(X, Y), path)
    code, _, err = run_cli(
        capsys, "publish", str(path), "--name", "lr", "--metadata", "derived_from=forged:99"
    )
    assert code == 2
    assert "derived_from" in err
    assert env.repo.list_versions("lr") == []
