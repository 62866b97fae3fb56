"""``serving import mlflow`` against a real ``mlflow server`` on loopback.

The module fixture starts the tracking server (SQLite backend, local artifact root,
served artifacts) from ``$SERVING_TEST_MLFLOW_SERVER`` or ``.cache/mlflow-venv``
(``make test`` builds it), and stops its process group afterwards. Models are logged
and registered with the real ``mlflow`` client; each test uses its own model names.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from cli_runner import run_cli
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from serving import cli
from serving.formats import load_predictor
from serving.mlflow_import import MlflowRef, MlflowRegistry, import_model, sync, sync_once
from serving.repository import Repository
from serving.settings import Settings
from serving.store import open_store
from serving.testing import free_port
from serving.trust import check_trust

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("pandas")  # NOTE: mlflow.sklearn.log_model needs it

REPO_ROOT = Path(__file__).resolve().parents[2]
X, Y = load_iris(return_X_y=True)
ROWS = X[:5]


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _server_binary() -> str | None:
    explicit = os.environ.get("SERVING_TEST_MLFLOW_SERVER")
    if explicit:
        return explicit
    venv = REPO_ROOT / ".cache" / "mlflow-venv" / "bin" / "mlflow"
    return str(venv) if venv.is_file() else None


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server on loopback; stopped (with its workers) afterwards."""
    binary = _server_binary()
    if binary is None:
        reason = (
            "no mlflow server: run `make test` (builds .cache/mlflow-venv) or set SERVING_TEST_MLFLOW_SERVER"
        )
        if _on_ci():
            pytest.fail(f"{reason} (CI=true: required)")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("wb")
    cmd = [binary, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    # NOTE: its own session, so stopping it reaches the uvicorn and job workers it starts.
    # NOTE: no job execution (GenAI evaluation jobs): it starts a job runner and a huey store
    # that MLflow puts in a /dev/shm folder it never removes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"mlflow server exited {proc.returncode}: {(root / 'server.log').read_text()}"
                )
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow server not healthy after 120s: {(root / 'server.log').read_text()}"
                )
            time.sleep(0.2)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(url)
        yield url
        mlflow.set_tracking_uri(previous)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder store and cache, through the environment the CLI reads."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("SERVING_STORE", str(store))
    monkeypatch.setenv("SERVING_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SERVING_PROGRESS", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SERVING_UNRESTRICTED_MODELS", raising=False)
    return store


def _repo(store: Path) -> Repository:
    return Repository(open_store(str(store), Settings(store=str(store))))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def log_sklearn(name: str, *, c: float = 1.0, serialization: str = "pickle") -> tuple[Any, str, Any]:
    """Train, log and register an iris classifier; returns (model, run id, model version)."""
    import mlflow.sklearn

    model = LogisticRegression(max_iter=300, C=c).fit(X, Y)
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", float(model.score(X, Y)))
        mlflow.log_param("C", c)
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            registered_model_name=name,
            serialization_format=serialization,
            pip_requirements=["scikit-learn"],
        )
    return model, run.info.run_id, info.registered_model_version


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("serving") and ": error: " in line]


def test_alias_import_round_trip(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str], record_property: Any
) -> None:
    """train -> MLflow register + alias -> import with --alias -> the published version
    predicts what the trained model predicts, and carries run id, version and metrics."""
    name = _unique("iris")
    model, run_id, mv = log_sklearn(name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", mv)

    started = time.perf_counter()
    code, _, err = run_cli(
        capsys, "import", "mlflow", f"models:/{name}@champion", "--tracking-uri", tracking_uri,
        "--alias", "production", "--json",
    )  # fmt: skip
    assert code == 0, err
    repo = _repo(env)
    assert repo.get_alias(name, "production").version == "1"
    manifest, _ = repo.manifest(name, "1")
    assert manifest.format == "pickle"
    source = manifest.metadata["mlflow"]
    assert source["run_id"] == run_id
    assert source["model_version"] == str(mv)
    assert source["alias"] == "champion"
    assert source["serialization_format"] == "pickle"
    assert source["metrics"]["accuracy"] == pytest.approx(model.score(X, Y))
    assert "MLmodel" in {f.path for f in manifest.files}

    settings = Settings(store=str(env), cache_dir=env.parent / "cache")
    from serving.cache import LoaderCache

    cache = LoaderCache(settings.cache_dir, 1 << 30)
    resolved, _ = cache.resolve(repo, cli.ModelRef.parse(f"{name}@production"))
    trust = check_trust(repo, resolved, settings, cache_root=cache.root)
    assert trust.load_class == "restricted"
    cached = cache.fetch(repo, resolved)
    predictor = load_predictor(cached.path, cached.manifest, trust.policy)
    got = predictor.predict({predictor.inputs[0].name: ROWS})
    round_trip = time.perf_counter() - started
    np.testing.assert_array_equal(got["predict"], model.predict(ROWS))
    np.testing.assert_allclose(got["predict_proba"], model.predict_proba(ROWS))
    record_property("mlflow_import_round_trip_s", round(round_trip, 3))
    print(f"MLflow import round trip (import + fetch + load + predict): {round_trip:.2f}s")


def test_version_and_runs_uris_import_the_same_artifacts(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """models:/NAME/VERSION and runs:/RUN_ID/model (with --name, tracking URI from
    MLFLOW_TRACKING_URI) publish byte-identical model files."""
    name = _unique("iris")
    _, run_id, mv = log_sklearn(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    code, _, err = run_cli(capsys, "import", "mlflow", f"models:/{name}/{mv}")
    assert code == 0, err
    code, _, err = run_cli(capsys, "import", "mlflow", f"runs:/{run_id}/model", "--name", name)
    assert code == 0, err
    repo = _repo(env)
    first, _ = repo.manifest(name, "1")
    second, _ = repo.manifest(name, "2")
    model_file = first.options["file"]
    digests = [{f.path: f.sha256 for f in m.files}[model_file] for m in (first, second)]
    assert digests[0] == digests[1]
    assert second.metadata["mlflow"]["run_id"] == run_id
    assert second.metadata["mlflow"]["model_version"] is None


def test_sync_once_imports_only_when_the_mlflow_alias_moves(tracking_uri: str, env: Path) -> None:
    """One poll imports the alias's version; an unchanged alias imports nothing; a
    moved alias imports the new MLflow version and moves our alias to it."""
    name = _unique("iris")
    client = mlflow.MlflowClient()
    _, _, v1 = log_sklearn(name, c=1.0)
    client.set_registered_model_alias(name, "champion", v1)
    registry = MlflowRegistry(tracking_uri)
    repo = _repo(env)
    settings = Settings(store=str(env))
    ref = MlflowRef.parse(f"models:/{name}@champion")
    kwargs: dict[str, Any] = {"settings": settings, "alias": "production"}

    key, imported = sync_once(registry, repo, ref, None, **kwargs)
    assert imported is not None
    assert imported.manifest.version == "1"
    key, imported = sync_once(registry, repo, ref, key, **kwargs)
    assert imported is None
    assert repo.list_versions(name) == ["1"]

    _, _, v2 = log_sklearn(name, c=0.01)
    client.set_registered_model_alias(name, "champion", v2)
    key, imported = sync_once(registry, repo, ref, key, **kwargs)
    assert imported is not None
    assert imported.manifest.metadata["mlflow"]["model_version"] == str(v2)
    assert repo.get_alias(name, "production").version == imported.manifest.version == "2"


def test_sync_loop_stops_after_max_polls_and_does_not_reimport(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--sync --max-polls 3` imports once, then finds the same MLflow version; a
    restarted sync sees it is already imported; a set stop event ends the loop."""
    name = _unique("iris")
    _, _, mv = log_sklearn(name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", mv)
    argv = ["import", "mlflow", f"models:/{name}@champion", "--tracking-uri", tracking_uri]
    argv += ["--sync", "--interval", "0.05", "--max-polls", "3"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert out.count("imported ") == 1
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "imported " not in out
    assert _repo(env).list_versions(name) == ["1"]

    stop = threading.Event()
    stop.set()
    registry = MlflowRegistry(tracking_uri)
    ref = MlflowRef.parse(f"models:/{name}@champion")
    assert sync(registry, _repo(env), ref, interval_s=60, stop=stop, settings=Settings(store=str(env))) == 0


def test_cloudpickle_is_refused_unless_signed_and_opted_in(
    tracking_uri: str,
    env: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cloudpickle sklearn model is refused (exit 6, one line, nothing published); with
    SERVING_UNRESTRICTED_MODELS and --signing-key it is published as a signed,
    unrestricted version."""
    name = _unique("iris")
    _, _, mv = log_sklearn(name, serialization="cloudpickle")
    uri = f"models:/{name}/{mv}"
    code, _, err = run_cli(capsys, "import", "mlflow", uri, "--tracking-uri", tracking_uri)
    assert code == 6
    (line,) = _error_lines(err)
    assert "cloudpickle" in line
    assert "SERVING_UNRESTRICTED_MODELS" in line
    assert "--signing-key" in line
    assert _repo(env).list_versions(name) == []

    monkeypatch.setenv("SERVING_UNRESTRICTED_MODELS", name)
    code, _, err = run_cli(capsys, "import", "mlflow", uri, "--tracking-uri", tracking_uri)
    assert code == 6, "opted in but unsigned is still refused"
    assert "--signing-key" in _error_lines(err)[0]

    key = tmp_path / "release"
    assert run_cli(capsys, "keygen", str(key))[0] == 0
    code, _, err = run_cli(
        capsys, "import", "mlflow", uri, "--tracking-uri", tracking_uri, "--signing-key", f"{key}.key"
    )
    assert code == 0, err
    repo = _repo(env)
    settings = Settings(store=str(env), trusted_keys=[Path(f"{key}.pub")], unrestricted_models=[name])
    from serving.cache import LoaderCache

    cache = LoaderCache(tmp_path / "cache2", 1 << 30)
    resolved, _ = cache.resolve(repo, cli.ModelRef.parse(f"{name}:1"))
    trust = check_trust(repo, resolved, settings, cache_root=cache.root)
    assert (trust.load_class, trust.signed) == ("unrestricted", True)


class _Doubler(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # NOTE: MLflow reads hints
        return np.asarray(model_input) * 2


def test_cloudpickle_only_pyfunc_is_refused(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A custom PythonModel (only cloudpickle loads it) is refused with a reason."""
    name = _unique("pyfunc")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_Doubler(), registered_model_name=name, pip_requirements=["numpy"]
        )
    code, _, err = run_cli(
        capsys,
        "import",
        "mlflow",
        f"models:/{name}/{info.registered_model_version}",
        "--tracking-uri",
        tracking_uri,
    )
    assert code == 6
    (line,) = _error_lines(err)
    assert "pyfunc" in line
    assert "cloudpickle" in line
    assert _repo(env).list_versions(name) == []


def test_onnx_flavor_imports_as_onnx(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An MLflow onnx model becomes an onnx version that predicts like the source model."""
    pytest.importorskip("onnxruntime")
    import mlflow.onnx
    from skl2onnx import to_onnx

    name = _unique("iris-onnx")
    model = LogisticRegression(max_iter=300).fit(X.astype(np.float32), Y)
    onx = to_onnx(model, X[:1].astype(np.float32), options={"zipmap": False})
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onx, name="model", registered_model_name=name, pip_requirements=["onnx"])
    code, _, err = run_cli(
        capsys,
        "import",
        "mlflow",
        f"models:/{name}/{info.registered_model_version}",
        "--tracking-uri",
        tracking_uri,
    )
    assert code == 0, err
    repo = _repo(env)
    manifest, _ = repo.manifest(name, "1")
    assert manifest.format == "onnx"
    settings = Settings(store=str(env))
    from serving.cache import LoaderCache

    cache = LoaderCache(env.parent / "cache", 1 << 30)
    resolved, _ = cache.resolve(repo, cli.ModelRef.parse(f"{name}:1"))
    trust = check_trust(repo, resolved, settings, cache_root=cache.root)
    assert trust.load_class == "safe"
    cached = cache.fetch(repo, resolved)
    predictor = load_predictor(cached.path, cached.manifest, trust.policy)
    got = predictor.predict({predictor.inputs[0].name: ROWS.astype(np.float32)})
    np.testing.assert_array_equal(next(iter(got.values())), model.predict(ROWS.astype(np.float32)))


@pytest.mark.parametrize(
    ("argv", "code", "reason"),
    [
        (["models:iris"], 2, "is not models:/NAME@ALIAS"),
        (["runs:/abc/../x"], 2, "may not contain '..'"),
        (["models:/iris@champion"], 2, "no MLflow tracking server"),
        (["models:/iris/1", "--max-polls", "2"], 2, "--max-polls needs --sync"),
        (["models:/iris@champion", "--sync", "--interval", "0"], 2, "must be greater than 0"),
    ],
    ids=["bad-uri", "dotdot", "no-tracking-uri", "max-polls-without-sync", "zero-interval"],
)
def test_bad_input_exits_with_one_line(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, reason: str
) -> None:
    """Malformed URIs and missing settings end with an exit code and one line."""
    got, _, err = run_cli(capsys, "import", "mlflow", *argv)
    assert got == code
    (line,) = _error_lines(err)
    assert reason in line


def test_missing_alias_and_unreachable_server(
    tracking_uri: str, env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An alias MLflow does not have is not found (exit 3); a closed port is
    unreachable (exit 9) and says so within seconds."""
    code, _, err = run_cli(
        capsys, "import", "mlflow", f"models:/{_unique('none')}@champion", "--tracking-uri", tracking_uri
    )
    assert code == 3
    assert "not found" in _error_lines(err)[0]
    started = time.monotonic()
    closed = f"http://127.0.0.1:{free_port()}"
    code, _, err = run_cli(capsys, "import", "mlflow", "models:/iris/1", "--tracking-uri", closed)
    assert code == 9
    assert "unreachable" in _error_lines(err)[0]
    assert time.monotonic() - started < 60


def test_credentials_in_the_tracking_uri_stay_out_of_the_manifest(tracking_uri: str, env: Path) -> None:
    """user:password in the tracking URI is stripped from metadata."""
    name = _unique("iris")
    _, _, mv = log_sklearn(name)
    with_creds = tracking_uri.replace("http://", "http://alice:s3cret@")
    registry = MlflowRegistry(with_creds)
    imported = import_model(registry, _repo(env), f"models:/{name}/{mv}", settings=Settings(store=str(env)))
    assert "s3cret" not in str(imported.manifest.metadata)
    assert imported.manifest.metadata["mlflow"]["tracking_uri"] == tracking_uri
