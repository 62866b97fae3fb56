"""scikit-learn estimators saved with joblib (``sklearn``) or plain ``pickle``.

Both load through :mod:`serving.formats.unpickler`'s exact allowlist, then
:mod:`serving.formats.guard` checks what the built objects hold.
"""

from __future__ import annotations

import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import InvalidInput
from serving.manifest import Manifest, TensorSpec

from . import guard, unpickler
from ._common import default_inputs, pick_inputs, primary_file
from .base import Format, LoadPolicy, Predictor, oip_datatype
from .table import FORMAT_FACTS

_METHODS = ("predict", "predict_proba", "decision_function")
_JOBLIB_SUFFIXES = FORMAT_FACTS["sklearn"].suffixes
_PICKLE_SUFFIXES = FORMAT_FACTS["pickle"].suffixes
# joblib compresses with these; the magic numbers let detection look past the extension.
_COMPRESSED_MAGIC = (
    b"ZF",
    b"\x78\x01",
    b"\x78\x5e",
    b"\x78\x9c",
    b"\x78\xda",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ",
)


class EstimatorPredictor(Predictor):
    """Calls ``predict`` and, when the estimator has them, ``predict_proba`` and ``decision_function``."""

    def __init__(self, model: Any, inputs: list[TensorSpec], outputs: list[TensorSpec] | None = None) -> None:
        if not callable(getattr(model, "predict", None)):
            raise InvalidInput(f"{type(model).__name__} has no predict method")
        self.model = model
        self.methods = [m for m in _METHODS if callable(getattr(model, m, None))]
        self.inputs = inputs
        self.outputs = outputs or _infer_outputs(model, self.methods)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(inputs, {o.name for o in self.outputs})

    def predict_only(self, inputs: dict[str, np.ndarray], names: Collection[str]) -> dict[str, np.ndarray]:
        declared = {o.name for o in self.outputs}
        # NOTE: each method validates the input again (a third of a 1-row request each).
        return self._run(inputs, set(names) if declared.issuperset(names) else declared)

    @property
    def primary_output(self) -> str:
        declared = {o.name for o in self.outputs}
        return next((m for m in self.methods if m in declared), self.outputs[0].name)

    def _run(self, inputs: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
        (x,) = pick_inputs(self.inputs[:1], inputs)
        out: dict[str, np.ndarray] = {}
        for method in self.methods:
            if method not in wanted:
                continue
            try:
                out[method] = np.asarray(getattr(self.model, method)(x))
            except AttributeError:
                # NOTE: e.g. SVC(probability=False) exposes predict_proba but raises.
                continue
        return out


def checked_estimator(model: Any, path: Path, manifest: Manifest, policy: LoadPolicy) -> EstimatorPredictor:
    """Serve a freshly built estimator once :func:`serving.formats.guard.check_loaded` passes it."""
    gate = unpickler.GlobalPolicy(policy.trusted_globals, path.name)
    guard.check_loaded(model, gate.admits, path.name)
    return EstimatorPredictor(model, default_inputs(manifest, "FP64"), manifest.outputs)


def _infer_outputs(model: Any, methods: list[str]) -> list[TensorSpec]:
    """Output specs from the fitted estimator: ``classes_`` gives label dtype and width."""
    classes = getattr(model, "classes_", None)
    n = len(classes) if isinstance(classes, np.ndarray) and classes.ndim == 1 else -1
    specs = []
    for m in methods:
        if m == "predict":
            dtype = oip_datatype(classes.dtype) if isinstance(classes, np.ndarray) else "FP64"
            specs.append(TensorSpec(name=m, datatype=dtype, shape=[-1]))
        elif m == "decision_function" and n == 2:
            specs.append(TensorSpec(name=m, datatype="FP64", shape=[-1]))
        else:
            specs.append(TensorSpec(name=m, datatype="FP64", shape=[-1, n]))
    return specs


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _mentions_joblib(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"joblib.numpy_pickle" in f.read(1024 * 1024)


class SklearnFormat(Format, facts=FORMAT_FACTS["sklearn"]):
    """An estimator saved with ``joblib.dump`` (optionally compressed)."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix.lower() in _JOBLIB_SUFFIXES:
            return True
        if path.suffix.lower() in _PICKLE_SUFFIXES or zipfile.is_zipfile(path):
            return False
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(_COMPRESSED_MAGIC):
            return True
        return _looks_like_pickle(path) and _mentions_joblib(path)

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        path = primary_file(root, manifest, _JOBLIB_SUFFIXES)
        limit = policy.expansion_limit(path.stat().st_size)
        model = unpickler.load_joblib(path, policy.trusted_globals, max_expanded_bytes=limit)
        return checked_estimator(model, path, manifest, policy)


class PickleFormat(Format, facts=FORMAT_FACTS["pickle"]):
    """An estimator (or any object with ``predict``) saved with ``pickle.dump``."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            return True
        return _looks_like_pickle(path) and not _mentions_joblib(path)

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        path = primary_file(root, manifest, _PICKLE_SUFFIXES)
        model = unpickler.load_pickle(path, policy.trusted_globals)
        return checked_estimator(model, path, manifest, policy)
