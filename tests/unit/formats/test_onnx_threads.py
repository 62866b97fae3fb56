"""A manifest's ``intra_op_num_threads`` is bounded by the CPUs the process may use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.cache import LoaderCache
from serving.errors import InvalidManifest
from serving.formats import load_predictor
from serving.formats.base import LoadPolicy
from serving.formats.onnx_runtime import available_cpus
from serving.publish import publish_path
from serving.repository import Repository
from serving.store.local import LocalStore

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def identity(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def load(tmp_path: Path, threads: object) -> object:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    name = f"t{abs(hash(repr(threads))) % 10**6}"
    publish_path(
        repo, identity(tmp_path / "m.onnx"), name, version="1", options={"intra_op_num_threads": threads}
    )
    cached = LoaderCache(tmp_path / "cache", max_bytes=10**9).fetch(repo, repo.resolve(f"{name}:1"))
    return load_predictor(cached.path, cached.manifest, LoadPolicy())


@pytest.mark.parametrize("threads", [2000, 0, -1, "4", True, available_cpus() + 1])
def test_thread_counts_past_the_cpus_or_of_the_wrong_type_are_refused(
    tmp_path: Path, threads: object
) -> None:
    with pytest.raises(
        InvalidManifest, match=rf"intra_op_num_threads .* the limit is 1\.\.{available_cpus()}"
    ):
        load(tmp_path, threads)


def test_a_thread_count_within_the_cpus_loads(tmp_path: Path) -> None:
    predictor: object = load(tmp_path, 1)
    out = predictor.predict({"x": np.ones((1, 2), np.float32)})  # type: ignore[attr-defined]
    np.testing.assert_array_equal(next(iter(out.values())), [[1.0, 1.0]])
