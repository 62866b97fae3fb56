"""Each crafted version is refused by name before any predict, in a model worker.

The loads run in real model workers, so a defence that misses a case shows up as a
failed test (an IsolationFailed crash), not as a dead test process. Cases marked
"(own)" are ours: the defence was not written for them (SECURITY.md records what held).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import crafted
import numpy as np
import pytest

from serving.cache import LoaderCache
from serving.errors import DeadlineExceeded, InvalidManifest, IsolationFailed, UntrustedArtifact
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.publish import publish_path
from serving.repository import Repository
from serving.store.local import LocalStore
from serving.testing.poll import wait_for

CASES: dict[str, tuple[Callable[[Path], crafted.Case], str]] = {
    "kd-tree indices out of range in one unvisited leaf": (
        crafted.kd_tree_bad_leaf,
        r"model._tree is a malformed tree \(idx_array points outside",
    ),
    "kd-tree leaf range past its indices (own)": (crafted.kd_tree_bad_node_range, "idx_start..idx_end"),
    "kd-tree inner node with no children (own)": (
        crafted.kd_tree_inner_node_without_children,
        "children are past the",
    ),
    "sparse coef_ with out-of-range indices": (crafted.sparse_coef_heap_read, r"coef_ is a malformed sparse"),
    "sparse coef_ whose indptr runs past its data (own)": (
        crafted.sparse_indptr_past_data,
        "malformed sparse",
    ),
    "vectorizer ngram_range (1, 10**6)": (crafted.vectorizer_ngram_bomb, r"ngram_range .* the limit is"),
    "character n-grams (1, 4096) (own)": (crafted.vectorizer_char_ngram_bomb, r"ngram_range .* the limit is"),
    "torch weights with strides (0, 0)": (crafted.torch_zero_stride_weights, "zero-stride view"),
    "torch weights that overlap themselves (own)": (crafted.torch_overlapping_weights, "overlaps itself"),
    "torch MaxPool1d(kernel_size=10**6) with no weights": (
        crafted.torch_weightless_pool,
        r"\(MaxPool1d\) has kernel_size=1000000, over the limit of 4096",
    ),
    "torch Upsample(scale_factor=128) with no weights (own)": (
        crafted.torch_weightless_upsample,
        r"scale_factor=128.0, over the limit",
    ),
    "Keras Lambda over keras.ops.zeros": (crafted.keras_lambda_zeros, "is keras.layers.Lambda"),
    "Keras weights declared at full shape, nothing stored": (crafted.keras_zero_fill_weights, "but stores 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_crafted_version_is_refused_with_the_attribute_and_the_limit(case: str, tmp_path: Path) -> None:
    build, reason = CASES[case]
    path, fmt, kwargs = build(tmp_path)
    repo = Repository(LocalStore(str(tmp_path / "store")))
    name = f"m{uuid.uuid4().hex[:8]}"
    publish_path(repo, path, name, version="1", format=fmt, **kwargs)
    cached = LoaderCache(tmp_path / "cache", max_bytes=10**10).fetch(repo, repo.resolve(f"{name}:1"))
    with pytest.raises(UntrustedArtifact, match=reason):
        WorkerPredictor(cached, LoadPolicy(), WorkerLimits(load_timeout_s=120), model=name).close()


def test_a_manifest_no_reader_would_accept_is_refused_before_any_upload(tmp_path: Path) -> None:
    """Readers stop at 4 MiB; publishing checks the same limit first, so nothing half-written stays."""
    import joblib
    from sklearn.dummy import DummyClassifier

    path = tmp_path / "m.joblib"
    joblib.dump(DummyClassifier().fit([[0.0]], [0]), path)
    store = LocalStore(str(tmp_path / "store"))
    with pytest.raises(InvalidManifest, match="readers accept at most"):
        publish_path(Repository(store), path, "big", version="1", metadata={"notes": "x" * (5 * 1024**2)})
    assert list(store.list("big/")) == []


def _cached(tmp_path: Path, case: crafted.Case) -> tuple[str, object]:
    path, fmt, kwargs = case
    repo = Repository(LocalStore(str(tmp_path / "store")))
    name = f"m{uuid.uuid4().hex[:8]}"
    publish_path(repo, path, name, version="1", format=fmt, **kwargs)
    return name, LoaderCache(tmp_path / "cache", max_bytes=10**10).fetch(repo, repo.resolve(f"{name}:1"))


def test_an_onnx_graph_that_folds_to_a_gibibyte_is_refused_by_its_workers_memory_limit(
    tmp_path: Path,
) -> None:
    """onnxruntime folds constants when the session is created: the load, not a request, blows up."""
    name, cached = _cached(tmp_path, crafted.onnx_constant_fold_bomb(tmp_path))
    limits = WorkerLimits(memory_bytes=768 * 1024**2, load_timeout_s=120)
    with pytest.raises(IsolationFailed, match=r"\(oom\)"):
        WorkerPredictor(cached, LoadPolicy(), limits, model=name).close()  # type: ignore[arg-type]


def test_an_onnx_loop_the_request_drives_gets_504_and_its_worker_comes_back(tmp_path: Path) -> None:
    name, cached = _cached(tmp_path, crafted.onnx_request_controlled_loop(tmp_path))
    limits = WorkerLimits(predict_timeout_s=1.0, restart_backoff_s=0.1, load_timeout_s=120)
    worker = WorkerPredictor(cached, LoadPolicy(), limits, model=name)  # type: ignore[arg-type]
    try:
        first = worker.pid
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            worker.predict({"X": np.array([[1e12, 0, 0, 0]], dtype=np.float32)})
        assert time.monotonic() - started < 5
        wait_for(lambda: worker.pid not in (None, first), timeout=10, what="a new worker")
        row = np.array([[0.25, 0.25, 0.25, 0.25]], dtype=np.float32)
        np.testing.assert_array_equal(worker.predict({"X": row})["Y"], row)
    finally:
        worker.close()


def test_a_keras_layer_that_allocates_past_the_limit_at_load_costs_only_its_worker(tmp_path: Path) -> None:
    """The case the Keras guard does not refuse: ``Dense(10**8)`` with no weights. Keras
    allocates it before reading the weights; the worker's memory limit ends the load."""
    name, cached = _cached(tmp_path, crafted.keras_dense_without_weights(tmp_path))
    limits = WorkerLimits(memory_bytes=3 * 1024**3, load_timeout_s=180)
    with pytest.raises(IsolationFailed, match=r"\(oom\)"):
        WorkerPredictor(cached, LoadPolicy(), limits, model=name).close()  # type: ignore[arg-type]
