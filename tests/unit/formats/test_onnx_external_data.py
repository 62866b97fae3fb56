"""ONNX external data may only come from inside the version directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.errors import UntrustedArtifact
from serving.formats import LoadPolicy, load_predictor
from serving.manifest import Manifest
from serving.repository import collect_files, file_entries

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def write_model(directory: Path, location: str | None) -> None:
    """y = x + w, with w (4 floats) stored externally at ``location`` when given."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), name="w")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in {"location": location, "offset": "0", "length": "16"}.items():
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(model.SerializeToString())


def manifest_for(directory: Path) -> Manifest:
    return Manifest(name="m", version="1", format="onnx", files=file_entries(collect_files(directory)))


def test_external_data_inside_the_version_loads(tmp_path: Path) -> None:
    """A relative location next to the model is read, and inputs come from the graph."""
    version = tmp_path / "version"
    write_model(version, "weights.bin")
    (version / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    predictor = load_predictor(version, manifest_for(version), LoadPolicy())
    assert [(s.name, s.datatype, s.shape) for s in predictor.inputs] == [("x", "FP32", [-1, 4])]
    out = predictor.predict({"x": np.ones((2, 4), dtype=np.float32)})["y"]
    np.testing.assert_array_equal(out, np.ones((2, 4)) + np.arange(4))


@pytest.mark.parametrize("location", ["../secret.bin", "sub/../../secret.bin", "/etc/passwd"])
def test_external_data_escaping_the_version_is_refused(location: str, tmp_path: Path) -> None:
    """Locations with '..' or absolute paths raise UntrustedArtifact before onnxruntime reads them."""
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    version = tmp_path / "version"
    write_model(version, location)
    with pytest.raises(UntrustedArtifact, match="outside the model version"):
        load_predictor(version, manifest_for(version), LoadPolicy())
