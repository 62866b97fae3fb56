"""The malicious-artifact corpus: every payload is refused, and none of them runs.

Each test builds one artifact in a temporary directory, publishes it through
``publish_path``, and loads it the way serving does. The ``sentinel`` fixture
proves nothing ran: each payload would create a file or delete a directory.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from serving.errors import IntegrityError, InvalidManifest, LoadError, UntrustedArtifact
from serving.manifest import MANIFEST_NAME, SIGNATURE_NAME, TensorSpec

from . import corpus
from .conftest import Pipeline
from .corpus import PICKLE_PAYLOADS, Sentinel

PAYLOADS = sorted(PICKLE_PAYLOADS)


# -- pickle family ------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
def test_pickle_payload_is_refused(
    payload: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A plain pickle whose stream calls a dangerous global is refused by the unpickler's allowlist."""
    path = tmp_path / "model.pkl"
    path.write_bytes(corpus.pickle_of(PICKLE_PAYLOADS[payload](sentinel)))
    ref = pipeline.publish(path, "evil", format="pickle")
    refused = pipeline.attempt(f"pickle: {payload}", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error


@pytest.mark.parametrize("payload", PAYLOADS)
def test_joblib_payload_is_refused(
    payload: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """The same streams published as a joblib/sklearn model are refused too."""
    path = tmp_path / "model.joblib"
    path.write_bytes(corpus.pickle_of(PICKLE_PAYLOADS[payload](sentinel)))
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt(f"joblib: {payload}", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error


@pytest.mark.parametrize("compress", [0, 3], ids=["raw", "joblib-zlib"])
def test_payload_hidden_in_a_valid_sklearn_pipeline_is_refused(
    compress: int, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A fitted Pipeline with one poisoned attribute is refused, compressed by joblib or not."""
    import joblib

    path = tmp_path / "model.joblib"
    joblib.dump(corpus.sklearn_pipeline_with_payload(sentinel), path, compress=compress)
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt(f"sklearn pipeline (joblib compress={compress})", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error


def test_payload_hidden_in_a_pickled_sklearn_pipeline_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """The poisoned Pipeline as a plain pickle is refused."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(corpus.sklearn_pipeline_with_payload(sentinel)))
    ref = pipeline.publish(path, "evil", format="pickle")
    refused = pipeline.attempt("sklearn pipeline (pickle)", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error


# -- skops --------------------------------------------------------------------
def test_skops_function_outside_trusted_types_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A skops pipeline whose FunctionTransformer calls subprocess.run is refused, naming the type."""
    path = tmp_path / "model.skops"
    corpus.skops_pipeline_calling(path, subprocess.run)
    # NOTE: BYTES input, so a loaded model would get the command's argv as its rows.
    ref = pipeline.publish(
        path, "evil", format="skops", inputs=[TensorSpec(name="input-0", datatype="BYTES", shape=[-1])]
    )
    refused = pipeline.attempt(
        "skops: FunctionTransformer(func=subprocess.run)", ref, sentinel, example=sentinel.argv
    )
    assert isinstance(refused.error, UntrustedArtifact), refused.error
    assert "subprocess.run" in str(refused.error)


# -- torch --------------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
def test_torch_checkpoint_payload_is_refused(
    payload: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A torch.save archive whose data.pkl carries the payload is refused by weights_only."""
    path = tmp_path / "model.pt"
    corpus.torch_file_with_pickle(path, corpus.pickle_of(PICKLE_PAYLOADS[payload](sentinel)))
    ref = pipeline.publish(
        path,
        "evil",
        format="torch-state-dict",
        options={"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 2, "out_features": 1}},
    )
    refused = pipeline.attempt(f"torch: {payload}", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error


# -- keras / tensorflow ---------------------------------------------------------
def _keras_refusal(error: Exception) -> bool:
    text = str(error).lower()
    return isinstance(error, UntrustedArtifact) or (
        isinstance(error, LoadError)
        and any(w in text for w in ("safe_mode", "safe mode", "unsafe", "lambda"))
    )


@pytest.mark.slow
def test_keras_lambda_layer_is_refused(pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path) -> None:
    """A .keras model with a Python Lambda layer is refused by safe mode."""
    path = tmp_path / "model.keras"
    corpus.keras_lambda(path, sentinel)
    ref = pipeline.publish(path, "evil", format="keras")
    refused = pipeline.attempt("keras: Lambda layer", ref, sentinel, example=[[1.0, 2.0]])
    assert _keras_refusal(refused.error), refused.error


@pytest.mark.slow
def test_keras_config_naming_module_functions_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A .keras whose config.json names subprocess.Popen and os.system is refused."""
    path = tmp_path / "model.keras"
    corpus.keras_config_naming_function(path, sentinel)
    ref = pipeline.publish(path, "evil", format="keras")
    refused = pipeline.attempt(
        "keras: config.json names module functions", ref, sentinel, example=[[1.0, 2.0]]
    )
    assert isinstance(refused.error, UntrustedArtifact | LoadError), refused.error


@pytest.mark.slow
@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "opted-in-but-unsigned"])
def test_keras_h5_lambda_is_refused_before_deserialization(
    opted_in: bool, tmp_path: Path, sentinel: Sentinel
) -> None:
    """A legacy .h5 (no safe mode) is refused on its manifest unless signed and opted in."""
    pipeline = Pipeline(tmp_path, unrestricted_models=["evil"] if opted_in else [])
    path = tmp_path / "model.h5"
    corpus.keras_lambda(path, sentinel)
    ref = pipeline.publish(path, "evil")
    refused = pipeline.attempt(
        f"keras: .h5 Lambda ({'opted in, unsigned' if opted_in else 'default'})", ref, sentinel
    )
    assert refused.stage == "trust"
    assert isinstance(refused.error, UntrustedArtifact)


# -- onnx -----------------------------------------------------------------------
@pytest.mark.parametrize("location", ["../../../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_onnx_external_data_outside_the_version_is_refused(
    location: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """External data that escapes the version directory is refused before onnxruntime reads it."""
    src = tmp_path / "onnx-model"
    src.mkdir()
    corpus.onnx_with_external_data_outside(src / "model.onnx", location)
    ref = pipeline.publish(src, "evil", format="onnx")
    refused = pipeline.attempt(f"onnx: external data at {location}", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact), refused.error
    assert "outside" in str(refused.error)


# -- manifests and bombs ------------------------------------------------------------
@pytest.mark.parametrize("bad_path", ["../../escape.joblib", "/etc/cron.d/x", "a/../../b", "./model.joblib"])
def test_manifest_with_unsafe_path_is_refused(
    bad_path: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A manifest naming a path outside the version is refused when it is parsed."""
    path = tmp_path / "model.joblib"
    path.write_bytes(b"not even a pickle")
    ref = pipeline.publish(path, "evil", format="sklearn")
    mpath = pipeline.repo.store.root / "evil" / "versions" / "1" / MANIFEST_NAME  # type: ignore[attr-defined]
    doc = json.loads(mpath.read_bytes())
    doc["files"][0]["path"] = bad_path
    mpath.write_text(json.dumps(doc))
    refused = pipeline.attempt(f"manifest path {bad_path}", ref, sentinel)
    assert isinstance(refused.error, InvalidManifest)
    assert refused.stage == "resolve"


def test_oversized_version_is_refused_before_download(tmp_path: Path, sentinel: Sentinel) -> None:
    """A version larger than max_artifact_bytes is refused on its manifest, before any download."""
    pipeline = Pipeline(tmp_path, max_artifact_bytes=1024 * 1024)
    path = tmp_path / "model.joblib"
    with open(path, "wb") as f:
        f.truncate(2 * 1024 * 1024)
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("bomb: 2 MiB over a 1 MiB limit", ref, sentinel)
    assert refused.stage == "fetch"
    assert isinstance(refused.error, UntrustedArtifact)
    assert not list((pipeline.cache.root / "blobs").rglob("*"))


def test_version_with_too_many_files_is_refused(tmp_path: Path, sentinel: Sentinel) -> None:
    """An archive-bomb-shaped version (many files) is refused on its manifest."""
    pipeline = Pipeline(tmp_path, max_artifact_files=10)
    src = tmp_path / "many"
    src.mkdir()
    (src / "saved_model.pb").write_bytes(b"x")
    for i in range(20):
        (src / f"f{i}").write_bytes(b"x")
    ref = pipeline.publish(src, "evil", format="savedmodel")
    refused = pipeline.attempt("bomb: 21 files over a 10-file limit", ref, sentinel)
    assert refused.stage in {"trust", "fetch"}
    assert isinstance(refused.error, UntrustedArtifact)


# -- tampering and signatures --------------------------------------------------------
def _signed_pipeline(tmp_path: Path, keys: dict[str, Any], **kw: Any) -> Pipeline:
    return Pipeline(tmp_path, require_signature=True, trusted_keys=[keys["trusted_pub"]], **kw)


def _payload_file(tmp_path: Path, sentinel: Sentinel, name: str = "model.joblib") -> Path:
    path = tmp_path / name
    path.write_bytes(corpus.pickle_of(PICKLE_PAYLOADS["os.system"](sentinel)))
    return path


def test_unsigned_version_is_refused_in_require_signature_mode(
    tmp_path: Path, sentinel: Sentinel, keys: dict[str, Any]
) -> None:
    """require_signature refuses an unsigned version before any byte is downloaded."""
    pipeline = _signed_pipeline(tmp_path, keys)
    ref = pipeline.publish(_payload_file(tmp_path, sentinel), "evil", format="sklearn")
    refused = pipeline.attempt("tamper: unsigned version", ref, sentinel)
    assert refused.stage == "trust"
    assert "not signed" in str(refused.error)


def test_version_signed_by_untrusted_key_is_refused(
    tmp_path: Path, sentinel: Sentinel, keys: dict[str, Any]
) -> None:
    """A correct signature by a key nobody trusts is refused."""
    pipeline = _signed_pipeline(tmp_path, keys)
    path = _payload_file(tmp_path, sentinel)
    ref = pipeline.publish(path, "evil", format="sklearn", signing_key=keys["attacker"])
    refused = pipeline.attempt("tamper: signed by an untrusted key", ref, sentinel)
    assert refused.stage == "trust"
    assert "untrusted keys" in str(refused.error)


def test_files_replaced_under_a_valid_signature_are_refused(
    tmp_path: Path, sentinel: Sentinel, keys: dict[str, Any]
) -> None:
    """Swapping a signed version's file for a payload fails the digest check before loading."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    pipeline = _signed_pipeline(tmp_path, keys)
    good = tmp_path / "good.joblib"
    joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), good)
    ref = pipeline.publish(good, "evil", format="sklearn", signing_key=keys["trusted"])
    stored = pipeline.repo.store.root / "evil" / "versions" / "1" / "good.joblib"  # type: ignore[attr-defined]
    payload = corpus.pickle_of(PICKLE_PAYLOADS["os.system"](sentinel))
    stored.write_bytes(payload.ljust(stored.stat().st_size, b" "))
    refused = pipeline.attempt("tamper: file replaced under a valid signature", ref, sentinel)
    assert refused.stage == "fetch"
    assert isinstance(refused.error, IntegrityError)


def test_manifest_swapped_in_from_another_signed_version_is_refused(
    tmp_path: Path, sentinel: Sentinel, keys: dict[str, Any]
) -> None:
    """Version 1's validly signed manifest copied over version 2's is refused."""
    pipeline = _signed_pipeline(tmp_path, keys)
    ref1 = pipeline.publish(
        _payload_file(tmp_path, sentinel, "a.joblib"), "evil", signing_key=keys["trusted"], format="sklearn"
    )
    ref2 = pipeline.publish(
        _payload_file(tmp_path, sentinel, "b.joblib"), "evil", signing_key=keys["trusted"], format="sklearn"
    )
    assert (ref1, ref2) == ("evil:1", "evil:2")
    versions = pipeline.repo.store.root / "evil" / "versions"  # type: ignore[attr-defined]
    for name in (MANIFEST_NAME, SIGNATURE_NAME):
        shutil.copy(versions / "1" / name, versions / "2" / name)
    refused = pipeline.attempt("tamper: manifest swapped from another version", ref2, sentinel)
    assert refused.stage in {"resolve", "trust"}
    assert isinstance(refused.error, IntegrityError | UntrustedArtifact)


def test_signature_swapped_in_from_another_version_is_refused(
    tmp_path: Path, sentinel: Sentinel, keys: dict[str, Any]
) -> None:
    """Version 1's valid signature next to an unsigned version 2 is refused."""
    pipeline = _signed_pipeline(tmp_path, keys)
    pipeline.publish(
        _payload_file(tmp_path, sentinel, "a.joblib"), "evil", signing_key=keys["trusted"], format="sklearn"
    )
    ref2 = pipeline.publish(_payload_file(tmp_path, sentinel, "b.joblib"), "evil", format="sklearn")
    versions = pipeline.repo.store.root / "evil" / "versions"  # type: ignore[attr-defined]
    shutil.copy(versions / "1" / SIGNATURE_NAME, versions / "2" / SIGNATURE_NAME)
    refused = pipeline.attempt("tamper: signature swapped from another version", ref2, sentinel)
    assert refused.stage == "trust"
    assert "another manifest" in str(refused.error)


def test_signed_safe_version_still_loads(tmp_path: Path, keys: dict[str, Any]) -> None:
    """The control: a signed, honest sklearn model loads and predicts under the same settings."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    pipeline = _signed_pipeline(tmp_path, keys)
    good = tmp_path / "model.joblib"
    joblib.dump(LogisticRegression().fit([[0.0], [1.0]], [0, 1]), good)
    ref = pipeline.publish(good, "iris", format="sklearn", signing_key=keys["trusted"])
    predictor = pipeline.load(ref)
    assert predictor.predict_rows([[1.0]])
