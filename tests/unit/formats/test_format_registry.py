"""The format registry: names, detection from content and extension, and load errors."""

from __future__ import annotations

import pickle
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from serving.errors import LoadError, MissingExtra, UnknownFormat, UntrustedArtifact
from serving.formats import FORMATS, Format, LoadPolicy, Predictor, detect_format, get_format, load_predictor
from serving.formats._common import require
from serving.manifest import Manifest
from serving.repository import collect_files, file_entries

ALL_FORMATS = [
    "savedmodel",
    "onnx",
    "keras",
    "skops",
    "torch-export",
    "torchscript",
    "torch-state-dict",
    "safetensors",
    "keras-h5",
    "sklearn",
    "pickle",
]


def manifest_for(path: Path, fmt: str, **options: Any) -> Manifest:
    return Manifest(
        name="m", version="1", format=fmt, files=file_entries(collect_files(path)), options=options
    )


def test_every_format_is_registered_under_its_manifest_name() -> None:
    """FORMATS maps each manifest format name to its Format."""
    assert sorted(FORMATS) == sorted(ALL_FORMATS)
    assert all(get_format(name).name == name for name in ALL_FORMATS)


def test_unknown_format_name_lists_the_known_ones() -> None:
    """get_format('xgboost') raises UnknownFormat naming every known format."""
    with pytest.raises(UnknownFormat) as info:
        get_format("xgboost")
    assert str(info.value) == "unknown format 'xgboost': known formats are " + ", ".join(sorted(ALL_FORMATS))


def test_unrecognised_file_is_an_unknown_format(tmp_path: Path) -> None:
    """A text file matches no format: UnknownFormat says so and lists the formats."""
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(UnknownFormat, match=re.escape(f"cannot tell the format of file {path}")):
        detect_format(path)


def test_unrecognised_directory_is_an_unknown_format(tmp_path: Path) -> None:
    """A directory without a SavedModel or ONNX file matches no format."""
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(UnknownFormat, match="cannot tell the format of directory"):
        detect_format(tmp_path)


@pytest.fixture(scope="module")
def estimator() -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression().fit([[0.0], [1.0]], [0, 1])


@pytest.mark.parametrize("name", ["model.joblib", "model.bin", "model"])
def test_joblib_files_are_detected_as_sklearn(name: str, estimator: Any, tmp_path: Path) -> None:
    """joblib output is 'sklearn' by extension or, without one, by content."""
    path = tmp_path / name
    joblib.dump(estimator, path)
    assert detect_format(path) == "sklearn"


def test_compressed_joblib_is_detected_as_sklearn(estimator: Any, tmp_path: Path) -> None:
    """A compressed joblib file without a telling extension is 'sklearn' from its magic bytes."""
    path = tmp_path / "model.z"
    joblib.dump(estimator, path, compress=3)
    assert detect_format(path) == "sklearn"


@pytest.mark.parametrize("name", ["model.pkl", "model.bin"])
def test_plain_pickles_are_detected_as_pickle(name: str, estimator: Any, tmp_path: Path) -> None:
    """A pickle stream that joblib did not write is 'pickle'."""
    path = tmp_path / name
    path.write_bytes(pickle.dumps(estimator))
    assert detect_format(path) == "pickle"


def test_keras_archives_h5_savedmodels_and_onnx_are_detected(tmp_path: Path) -> None:
    """Format detection reads zip members, HDF5 magic and directory layouts."""
    keras_file = tmp_path / "model.keras"
    with zipfile.ZipFile(keras_file, "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("metadata.json", "{}")
        z.writestr("model.weights.h5", b"")
    h5 = tmp_path / "legacy.bin"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    saved = tmp_path / "sm"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07")
    (onnx_dir / "weights.bin").write_bytes(b"\0")
    assert detect_format(keras_file) == "keras"
    assert detect_format(h5) == "keras-h5"
    assert detect_format(saved) == "savedmodel"
    assert detect_format(onnx_dir) == "onnx"
    assert detect_format(onnx_dir / "model.onnx") == "onnx"


def test_torch_archives_are_told_apart(tmp_path: Path) -> None:
    """State dicts, TorchScript and torch.export archives are all zips; their members differ."""
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(2, 1).eval()
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    torch.jit.save(torch.jit.script(module), str(tmp_path / "scripted.pt"))
    program = torch.export.export(module, (torch.zeros(2, 2),))
    torch.export.save(program, str(tmp_path / "program.pt2"))
    assert detect_format(tmp_path / "weights.pt") == "torch-state-dict"
    assert detect_format(tmp_path / "scripted.pt") == "torchscript"
    assert detect_format(tmp_path / "program.pt2") == "torch-export"


def test_skops_files_are_detected_by_extension_or_schema(estimator: Any, tmp_path: Path) -> None:
    """skops.io output is 'skops' as .skops or, without the extension, from its schema.json member."""
    skops_io = pytest.importorskip("skops.io")
    skops_io.dump(estimator, tmp_path / "model.skops")
    skops_io.dump(estimator, tmp_path / "model.zip")
    assert detect_format(tmp_path / "model.skops") == "skops"
    assert detect_format(tmp_path / "model.zip") == "skops"


def test_safetensors_files_are_detected_by_extension_or_header(tmp_path: Path) -> None:
    """safetensors output is 'safetensors' as .safetensors or from its length-prefixed JSON header."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    state = torch.nn.Linear(2, 1).state_dict()
    save_file(state, str(tmp_path / "model.safetensors"))
    save_file(state, str(tmp_path / "weights"))
    assert detect_format(tmp_path / "model.safetensors") == "safetensors"
    assert detect_format(tmp_path / "weights") == "safetensors"


def test_pickle_whose_bytes_read_as_a_header_length_is_still_a_pickle(tmp_path: Path) -> None:
    """A pickle's first 8 bytes parse as a header length, but no JSON header follows: not safetensors."""
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"coef_": list(range(2000))}))
    assert detect_format(path) == "pickle"


# -- errors at load time ------------------------------------------------------------


class _AbsentFrameworkFormat(Format):
    """A real Format whose framework module is not installed anywhere."""

    name = "absent"
    framework = "absent-framework"
    extra = "absent"

    def detect(self, path: Path) -> bool:
        return False

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        require("serving_no_such_framework", self.extra, self.name)
        raise AssertionError("unreachable")


def test_missing_framework_names_the_pip_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A format whose framework is absent raises MissingExtra: 'install serving[<extra>]'."""
    monkeypatch.setitem(FORMATS, "absent", _AbsentFrameworkFormat())
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(MissingExtra, match=re.escape("install serving[absent]")) as info:
        load_predictor(tmp_path, manifest_for(tmp_path, "absent"), LoadPolicy())
    assert isinstance(info.value.__cause__, ImportError)


def test_require_names_the_extra_for_a_missing_module() -> None:
    """require() turns ImportError into MissingExtra naming module and extra."""
    with pytest.raises(MissingExtra, match=r"needs 'serving_nope'.*install serving\[torch\]"):
        require("serving_nope", "torch", "torchscript")


def test_framework_failure_becomes_load_error_with_cause(tmp_path: Path) -> None:
    """A truncated joblib file raises LoadError, the framework's exception chained."""
    (tmp_path / "model.joblib").write_bytes(b"\x80\x04\x95")
    with pytest.raises(LoadError) as info:
        load_predictor(tmp_path, manifest_for(tmp_path, "sklearn"), LoadPolicy())
    assert info.value.__cause__ is not None


def test_malicious_artifact_surfaces_as_untrusted_not_load_error(tmp_path: Path) -> None:
    """A refused global reaches the caller as UntrustedArtifact (403), not LoadError."""
    (tmp_path / "model.pkl").write_bytes(b"cos\nsystem\n(Vtrue\ntR.")
    with pytest.raises(UntrustedArtifact, match=r"'(posix|os)\.system'"):
        load_predictor(tmp_path, manifest_for(tmp_path, "pickle"), LoadPolicy())


def test_torch_class_path_must_be_a_module_class(tmp_path: Path) -> None:
    """class_path 'subprocess:Popen' is refused before init_kwargs could start a process."""
    torch = pytest.importorskip("torch")
    sentinel = tmp_path / "pwned"
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "model.pt")
    manifest = manifest_for(
        tmp_path,
        "torch-state-dict",
        class_path="subprocess:Popen",
        init_kwargs={"args": ["touch", str(sentinel)]},
    )
    with pytest.raises(UntrustedArtifact, match=r"not a torch\.nn\.Module"):
        load_predictor(tmp_path, manifest, LoadPolicy())
    assert not sentinel.exists()
    assert subprocess.Popen  # the class exists: refusal was the policy, not an import failure


def test_safetensors_class_path_must_be_a_module_class(tmp_path: Path) -> None:
    """safetensors shares torch-state-dict's class check: 'subprocess:Popen' is refused."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    sentinel = tmp_path / "pwned"
    save_file(torch.nn.Linear(2, 1).state_dict(), str(tmp_path / "model.safetensors"))
    manifest = manifest_for(
        tmp_path, "safetensors", class_path="subprocess:Popen", init_kwargs={"args": ["touch", str(sentinel)]}
    )
    with pytest.raises(UntrustedArtifact, match=r"not a torch\.nn\.Module"):
        load_predictor(tmp_path, manifest, LoadPolicy())
    assert not sentinel.exists()


def test_safetensors_with_missing_weights_is_a_load_error(tmp_path: Path) -> None:
    """The weights load strictly: a file lacking one of the module's tensors is a LoadError."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 2)}, str(tmp_path / "model.safetensors"))
    manifest = manifest_for(
        tmp_path,
        "safetensors",
        class_path="torch.nn:Linear",
        init_kwargs={"in_features": 2, "out_features": 1},
    )
    with pytest.raises(LoadError, match="bias"):
        load_predictor(tmp_path, manifest, LoadPolicy())


def test_torch_state_dict_without_class_path_is_a_load_error(tmp_path: Path) -> None:
    """A state dict needs options.class_path; without it the error says so."""
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "model.pt")
    with pytest.raises(LoadError, match="class_path"):
        load_predictor(tmp_path, manifest_for(tmp_path, "torch-state-dict"), LoadPolicy())


def test_sklearn_predictor_defaults_and_outputs(estimator: Any, tmp_path: Path) -> None:
    """Without declared inputs the predictor takes 'input-0' (FP64) and infers outputs from classes_."""
    joblib.dump(estimator, tmp_path / "model.joblib")
    predictor = load_predictor(tmp_path, manifest_for(tmp_path, "sklearn"), LoadPolicy())
    assert [(s.name, s.datatype, s.shape) for s in predictor.inputs] == [("input-0", "FP64", [-1, -1])]
    assert [(s.name, s.datatype, s.shape) for s in predictor.outputs] == [
        ("predict", "INT64", [-1]),
        ("predict_proba", "FP64", [-1, 2]),
        ("decision_function", "FP64", [-1]),
    ]
    out = predictor.predict({"input-0": np.array([[0.0], [1.0]])})
    assert out["predict"].tolist() == [0, 1]
