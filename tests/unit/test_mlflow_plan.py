"""How an MLflow model directory maps onto a format of ours, for the flavors the server tests
do not log (keras, tensorflow, pytorch, skops): the MLmodel file as MLflow writes it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.errors import UnknownFormat
from serving.mlflow_import import Plan, plan_import


def model_dir(tmp_path: Path, flavors: dict[str, Any], files: tuple[str, ...]) -> Path:
    root = tmp_path / "model"
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    root.mkdir(exist_ok=True)
    (root / "MLmodel").write_text(yaml.safe_dump({"mlflow_version": "3.17.2", "flavors": flavors}))
    return root


PYFUNC = {"python_function": {"loader_module": "mlflow.sklearn", "python_version": "3.11.7"}}


@pytest.mark.parametrize(
    ("flavors", "files", "expected"),
    [
        (
            {"sklearn": {"pickled_model": "model.skops", "serialization_format": "skops"}, **PYFUNC},
            ("model.skops",),
            ("sklearn", "skops", False, {"file": "model.skops"}),
        ),
        (
            {"keras": {"keras_version": "3.10.0", "save_format": "keras", "data": "data"}},
            ("data/model.keras",),
            ("keras", "keras", False, {"file": "data/model.keras"}),
        ),
        (
            {"keras": {"keras_version": "2.15.0", "save_format": "h5", "data": "data"}},
            ("data/model.h5",),
            ("keras", "keras-h5", True, {"file": "data/model.h5"}),
        ),
        (
            {"tensorflow": {"saved_model_dir": "tfmodel", "code": None}},
            ("tfmodel/saved_model.pb", "tfmodel/variables/variables.index"),
            ("tensorflow", "savedmodel", True, {"dir": "tfmodel"}),
        ),
        (
            {"pytorch": {"model_data": "data", "pytorch_version": "2.13.0", "export_model": True}},
            ("data/model.pt2",),
            ("pytorch", "torch-export", True, {"file": "data/model.pt2"}),
        ),
    ],
    ids=["sklearn-skops", "keras-v3", "keras-h5", "savedmodel", "torch-export"],
)
def test_each_flavor_maps_to_its_format(
    tmp_path: Path, flavors: dict[str, Any], files: tuple[str, ...], expected: tuple[Any, ...]
) -> None:
    plan: Plan = plan_import(model_dir(tmp_path, flavors, files))
    flavor, fmt, unrestricted, options = expected
    assert (plan.flavor, plan.format, plan.unrestricted) == (flavor, fmt, unrestricted)
    assert plan.options == options
    assert bool(plan.why) == unrestricted, "an unrestricted format says what runs code"


def test_a_pickled_torch_module_is_refused_with_the_way_out(tmp_path: Path) -> None:
    root = model_dir(
        tmp_path, {"pytorch": {"model_data": "data", "pytorch_version": "2.13.0"}}, ("data/model.pth",)
    )
    with pytest.raises(UnknownFormat, match="export_model=True"):
        plan_import(root)


def test_a_keras_flavor_without_a_model_file_is_refused(tmp_path: Path) -> None:
    root = model_dir(tmp_path, {"keras": {"data": "data"}}, ("data/readme.txt",))
    with pytest.raises(UnknownFormat, match=r"without a \.keras, \.h5 or SavedModel"):
        plan_import(root)


def test_a_model_file_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    """An MLmodel written by an attacker cannot point the import at another file."""
    (tmp_path / "secret.pkl").write_bytes(b"x")
    root = model_dir(
        tmp_path, {"sklearn": {"pickled_model": "../secret.pkl", "serialization_format": "pickle"}}, ()
    )
    with pytest.raises(UnknownFormat, match="not in the model directory"):
        plan_import(root)


def test_a_flavor_without_a_loader_names_the_ones_there_are(tmp_path: Path) -> None:
    root = model_dir(tmp_path, {"xgboost": {"data": "model.xgb"}}, ("model.xgb",))
    with pytest.raises(UnknownFormat, match="sklearn, onnx, keras/tensorflow"):
        plan_import(root)


def test_yaml_aliases_in_mlmodel_are_refused_before_they_expand(tmp_path: Path) -> None:
    """1.2 KB of anchors and aliases expanded to a 374 MB manifest; now refused unexpanded."""
    root = tmp_path / "model"
    (root / "data").mkdir(parents=True)
    (root / "model.onnx").write_bytes(b"x")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    lines += ["mlflow_version: *a8", "flavors: {onnx: {data: model.onnx}}"]
    (root / "MLmodel").write_text("\n".join(lines))
    assert len((root / "MLmodel").read_bytes()) < 2048
    with pytest.raises(UnknownFormat, match="aliases"):
        plan_import(root)


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"mlflow_version": ["3"], "flavors": {}}, "mlflow_version must be a string"),
        ({"mlflow_version": "3", "flavors": ["onnx"]}, "'flavors' must be a mapping"),
        ({"mlflow_version": "3", "flavors": {"onnx": {"data": {"x": 1}}}}, "flavors.onnx.data must be"),
        ({"mlflow_version": "x" * 5000, "flavors": {}}, "at most 1024 characters"),
    ],
)
def test_mlmodel_fields_of_the_wrong_type_or_size_are_refused(tmp_path: Path, doc: Any, match: str) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "MLmodel").write_text(yaml.safe_dump(doc))
    with pytest.raises(UnknownFormat, match=match):
        plan_import(root)


def test_an_oversized_mlmodel_is_refused_unread(tmp_path: Path) -> None:
    root = tmp_path / "model"
    root.mkdir()
    (root / "MLmodel").write_bytes(b"#" * (2 * 1024**2))
    with pytest.raises(UnknownFormat, match="over"):
        plan_import(root)
