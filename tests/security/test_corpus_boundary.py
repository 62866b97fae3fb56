"""The trust-boundary round of the corpus: what got through the by-package allowlist.

Each case was found by trying the loaders as an attacker with write access to the
store would: code through classes a by-package allowlist admitted, server files
read through skops's default trusted types, a crafted tree that crashes native
predict code, decompression and allocation bombs, sparse external data, and
oversized metadata. Each is refused, and a positive control shows the artifact
is live (it runs, reads or crashes when loaded without our checks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from serving.errors import InvalidManifest, UntrustedArtifact
from serving.manifest import MANIFEST_NAME, TensorSpec

from . import corpus
from .conftest import Pipeline
from .corpus import Sentinel

MB = 1024 * 1024


# -- code through classes the old allowlist admitted --------------------------------------
def test_scipy_distribution_setstate_gadget_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A scipy.stats distribution whose __setstate__ exec()s its state is refused by name."""
    path = tmp_path / "model.joblib"
    path.write_bytes(corpus.pickle_of(corpus.scipy_distribution_gadget(sentinel)))
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("admitted-class gadget: scipy.stats norm_gen.__setstate__", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "norm_gen" in str(refused.error)


def test_scipy_distribution_gadget_is_live(tmp_path: Path) -> None:
    """Positive control: plain pickle runs the gadget's code (in a child process)."""
    t = Sentinel(tmp_path / "PWNED", tmp_path / "canary", tmp_path / "script.py")
    t.canary.mkdir()
    path = tmp_path / "payload.pkl"
    path.write_bytes(corpus.pickle_of(corpus.scipy_distribution_gadget(t)))
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())", str(path)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert t.file.exists(), "the gadget did not run under plain pickle: the corpus entry is broken"


def test_admitted_class_as_a_callable_parameter_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """FunctionTransformer(func=numpy.ndarray) would allocate client-chosen shapes: refused."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.sklearn_class_as_callable(sentinel), path)
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("admitted class as func= (numpy.ndarray)", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "numpy.ndarray" in str(refused.error)


# -- server files read through skops's default trusted types --------------------------------
@pytest.mark.parametrize("fmt", ["skops", "sklearn"])
@pytest.mark.parametrize("kind", ["filename", "file"])
def test_vectorizer_that_opens_client_paths_is_refused(
    fmt: str, kind: str, pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A text pipeline whose CountVectorizer has input='filename' (or 'file') is refused on load."""
    secret = tmp_path / "secret.txt"
    secret.write_text("aaaa-server-secret")
    model = corpus.vectorizer_reading_files(kind)
    if fmt == "skops":
        import skops.io as sio

        path = tmp_path / "model.skops"
        sio.dump(model, path)
    else:
        path = tmp_path / "model.joblib"
        joblib.dump(model, path)
    ref = pipeline.publish(
        path, "evil", format=fmt, inputs=[TensorSpec(name="input-0", datatype="BYTES", shape=[-1])]
    )
    refused = pipeline.attempt(
        f"{fmt}: CountVectorizer(input={kind!r}) reads server files", ref, sentinel, example=[str(secret)]
    )
    assert isinstance(refused.error, UntrustedArtifact)
    assert f"input={kind!r}" in str(refused.error)


def test_vectorizer_file_read_is_live(tmp_path: Path) -> None:
    """Positive control: skops's own checks report nothing untrusted, and predict reads the file."""
    import skops.io as sio

    secret = tmp_path / "secret.txt"
    secret.write_text("aaaa")
    path = tmp_path / "model.skops"
    sio.dump(corpus.vectorizer_reading_files(), path)
    assert sio.get_untrusted_types(file=path) == []
    loaded = sio.load(path, trusted=[])
    assert loaded.predict([str(secret)]).shape == (1,)
    with pytest.raises(FileNotFoundError):
        loaded.predict([str(tmp_path / "missing")])


# -- a crafted version that crashes native code ----------------------------------------------
def test_tree_pointing_out_of_bounds_is_refused_before_predict(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A decision tree whose node array points out of bounds is refused before warm-up."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.tree_pointing_out_of_bounds(), path)
    ref = pipeline.publish(path, "evil", format="sklearn", example=[[1.5]])
    refused = pipeline.attempt("crash: decision tree child out of bounds", ref, sentinel, example=[[1.5]])
    assert isinstance(refused.error, UntrustedArtifact)
    assert "malformed tree" in str(refused.error)


def test_tree_pointing_out_of_bounds_crashes_unchecked(tmp_path: Path) -> None:
    """Positive control: the same file, loaded by plain joblib, kills the process that predicts."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.tree_pointing_out_of_bounds(), path)
    proc = subprocess.run(
        [sys.executable, "-c", "import joblib, sys; joblib.load(sys.argv[1]).predict([[1.5]])", str(path)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode < 0, f"expected death by a signal, got {proc.returncode}: {proc.stderr[-300:]!r}"


# -- bombs -------------------------------------------------------------------------------------
def test_xz_joblib_bomb_is_refused_while_it_inflates(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A few KiB of joblib-xz that inflate to 160 MiB are refused at the expansion limit, not loaded."""
    path = tmp_path / "model.joblib"
    corpus.write_xz_joblib_bomb(path, 160 * MB)
    assert path.stat().st_size < 200 * 1024
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("bomb: joblib xz 160 MiB", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "decompression bomb" in str(refused.error)


def test_xz_joblib_bomb_is_live(tmp_path: Path) -> None:
    """Positive control: joblib itself inflates the bomb whole."""
    path = tmp_path / "model.joblib"
    corpus.write_xz_joblib_bomb(path, 80 * MB)
    assert len(joblib.load(path)) == 80 * MB


def test_skops_schema_bomb_is_refused_before_inflating(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A skops zip whose schema.json deflates to 200 MiB is refused on its declared sizes."""
    path = tmp_path / "model.skops"
    corpus.write_skops_schema_bomb(path, 200 * MB)
    assert path.stat().st_size < 1 * MB
    ref = pipeline.publish(path, "evil", format="skops")
    refused = pipeline.attempt("bomb: skops schema.json deflate 200 MiB", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "expand" in str(refused.error)


def test_torch_init_kwargs_bomb_is_refused_before_allocating(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A 1 KB state dict whose init_kwargs build a 16384x16384 Linear is refused on the meta device."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    ref = pipeline.publish(
        path,
        "evil",
        format="torch-state-dict",
        options={
            "class_path": "torch.nn:Linear",
            "init_kwargs": {"in_features": 16384, "out_features": 16384},
        },
    )
    refused = pipeline.attempt("bomb: torch init_kwargs 16384x16384", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "init_kwargs" in str(refused.error)


# -- sparse external data and oversized metadata -----------------------------------------------
def test_onnx_sparse_tensor_external_data_outside_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A sparse initializer's external data that escapes the version is refused like a dense one's."""
    src = tmp_path / "onnx-model"
    src.mkdir()
    corpus.onnx_with_sparse_external_data(src / "model.onnx", "../../../outside.bin")
    ref = pipeline.publish(src, "evil", format="onnx")
    refused = pipeline.attempt("onnx: sparse tensor external data outside", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "outside" in str(refused.error)


def test_oversized_manifest_is_refused_before_it_is_read(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A manifest.json over max_metadata_bytes is refused from its size, before parsing."""
    path = tmp_path / "model.joblib"
    joblib.dump(np.zeros(3), path)
    ref = pipeline.publish(path, "evil", format="sklearn")
    mpath = pipeline.repo.store.root / "evil" / "versions" / "1" / MANIFEST_NAME  # type: ignore[attr-defined]
    with open(mpath, "ab") as f:
        f.write(b" " * (5 * MB))
    refused = pipeline.attempt("oversized manifest.json (5 MiB)", ref, sentinel)
    assert isinstance(refused.error, InvalidManifest)
    assert refused.stage == "resolve"
    assert "limit for manifests" in str(refused.error)


def test_stored_size_counts_against_the_artifact_limit(tmp_path: Path, sentinel: Sentinel) -> None:
    """A file declared 10 B of plaintext but 2 MiB stored is refused on a 1 MiB limit, before download."""
    import json

    pipeline = Pipeline(tmp_path, max_artifact_bytes=1 * MB)
    path = tmp_path / "model.joblib"
    path.write_bytes(os.urandom(2 * MB))
    ref = pipeline.publish(path, "evil", format="sklearn")
    mpath = pipeline.repo.store.root / "evil" / "versions" / "1" / MANIFEST_NAME  # type: ignore[attr-defined]
    doc = json.loads(mpath.read_bytes())
    entry = doc["files"][0]
    entry.update(
        size=10, encoding=["zstd"], stored_size=2 * MB, stored_sha256=entry["sha256"], sha256="0" * 64
    )
    mpath.write_text(json.dumps(doc))
    refused = pipeline.attempt("stored_size over the limit, plaintext declared 10 B", ref, sentinel)
    assert refused.stage == "fetch"
    assert isinstance(refused.error, UntrustedArtifact)
    assert not list((pipeline.cache.root / "blobs").rglob("*"))


# -- a second round, by an attacker who was not shown the defences -------------------------
def test_skops_key_type_that_writes_a_file_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A DictNode key_types entry that is an attribute lookup (ndarray.tofile) is refused by name."""
    path = tmp_path / "model.skops"
    corpus.skops_key_type_method_writing_a_file(path, sentinel)
    ref = pipeline.publish(path, "evil", format="skops")
    refused = pipeline.attempt("skops: key_types = ndarray.tofile (file write at load)", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "numpy.ndarray.tofile" in str(refused.error)


def test_skops_key_type_file_write_is_live(tmp_path: Path) -> None:
    """Positive control: skops itself writes the file when its own audit list is handed back as trusted."""
    import skops.io as sio

    t = Sentinel(tmp_path / "PWNED", tmp_path / "canary", tmp_path / "script.py")
    path = tmp_path / "model.skops"
    corpus.skops_key_type_method_writing_a_file(path, t)
    sio.load(path, trusted=sio.get_untrusted_types(file=path))
    assert t.file.read_bytes() == b"written by a model\n"


def test_skops_dict_subclass_hiding_a_callable_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A Pipeline step that is an OrderedDict with numpy.fromfile in its instance __dict__ is refused."""
    path = tmp_path / "model.skops"
    corpus.skops_dict_subclass_step(path)
    ref = pipeline.publish(path, "evil", format="skops")
    refused = pipeline.attempt("skops: dict-subclass step hiding numpy.fromfile", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "numpy.fromfile" in str(refused.error)


def test_a_dict_subclass_is_walked_as_an_object_too() -> None:
    """The loaded-model check sees a callable in a dict subclass's instance __dict__, not only its items."""
    from collections import OrderedDict

    from serving.formats.guard import check_loaded

    step: Any = OrderedDict()
    step.predict = np.fromfile
    with pytest.raises(UntrustedArtifact, match=r"model\[0\]\.predict is the callable 'numpy.fromfile'"):
        check_loaded([step], lambda name: False, "model.pkl")


def test_torch_class_path_naming_a_program_module_is_refused_before_import(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """class_path 'unittest.__main__:main' would run unittest's CLI on import and sys.exit()."""
    torch = pytest.importorskip("torch")
    sys.modules.pop("unittest.__main__", None)
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    ref = pipeline.publish(
        path, "evil", format="torch-state-dict", options={"class_path": "unittest.__main__:main"}
    )
    refused = pipeline.attempt("torch: class_path in a __main__ module", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "unittest.__main__" not in sys.modules


def test_zero_stride_array_is_refused(pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path) -> None:
    """A 700-byte joblib whose coef_ is a 1.6 GB zero-stride view of 8 bytes is refused on load."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.linear_model_with_zero_stride_coef(), path)
    assert path.stat().st_size < 4096
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("zero-stride coef_ (memory at predict)", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "non-contiguous view" in str(refused.error)


def test_zero_stride_array_is_live(tmp_path: Path) -> None:
    """Positive control: joblib builds the view, and one predicted row allocates N floats."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.linear_model_with_zero_stride_coef(rows=1_000_000), path)
    model: Any = joblib.load(path)
    assert model.coef_.strides == (0, 0)
    assert model.predict(np.zeros((1, 4))).shape == (1, 1_000_000)


def test_backtracking_token_pattern_is_refused(
    pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path
) -> None:
    """A CountVectorizer whose token_pattern backtracks catastrophically is refused before it serves."""
    path = tmp_path / "model.joblib"
    joblib.dump(corpus.vectorizer_with_backtracking_pattern(), path)
    ref = pipeline.publish(path, "evil", format="sklearn")
    refused = pipeline.attempt("CountVectorizer token_pattern ReDoS", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "backtrack" in str(refused.error)


@pytest.mark.parametrize(
    ("pattern", "linear"),
    [
        (r"(?u)\b\w\w+\b", True),  # sklearn's default
        (r"\b\w+\b", True),
        (r"[a-z]+", True),
        (r"(?:.|\s)*x", False),
        (r"(a+)+b", False),
        (r".*.*.*x", False),
        (r"(", False),
    ],
)
def test_token_pattern_check(pattern: str, linear: bool) -> None:
    """Single-character unbounded repeats pass (at most two); repeated groups and alternations do not."""
    from serving.formats.guard import _linear_regex

    assert _linear_regex(pattern) is linear


def test_list_of_range_is_refused(pipeline: Pipeline, sentinel: Sentinel, tmp_path: Path) -> None:
    """list(range(N)) from a 700-byte pickle: builtins.range is not on the allowlist."""
    path = tmp_path / "model.pkl"
    path.write_bytes(
        corpus.pickle_of(
            corpus.call(
                corpus.glob("builtins", "list"),
                corpus.call(corpus.glob("builtins", "range"), b"J\x00\xe1\xf5\x05"),
            )
        )
    )
    ref = pipeline.publish(path, "evil", format="pickle")
    refused = pipeline.attempt("list(range(100M))", ref, sentinel)
    assert isinstance(refused.error, UntrustedArtifact)
    assert "builtins.range" in str(refused.error)
