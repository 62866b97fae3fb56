"""Keras (``.keras``, legacy ``.h5``) and TensorFlow SavedModel directories."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import LoadError, UntrustedArtifact
from serving.manifest import Manifest, TensorSpec, check_relative_path

from ._common import pick_inputs, primary_file, require, shape_of, to_numpy_outputs
from .base import Format, LoadPolicy, Predictor, oip_datatype
from .keras_guard import check_keras_archive
from .table import FORMAT_FACTS

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _tf_datatype(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    if name == "string":
        return "BYTES"
    try:
        return oip_datatype(np.dtype(name))
    except (TypeError, KeyError):
        return "FP32"


class KerasPredictor(Predictor):
    """Calls the model with ``training=False``; inputs in ``model.inputs`` order."""

    def __init__(
        self, model: Any, manifest_inputs: list[TensorSpec] | None, outputs: list[TensorSpec] | None
    ):
        import keras

        self._keras = keras
        self.model = model
        self.inputs = manifest_inputs or self._infer_inputs(model)
        self.outputs = outputs or self._infer_outputs(model)

    @staticmethod
    def _infer_inputs(model: Any) -> list[TensorSpec]:
        try:
            tensors = list(model.inputs)
        except (AttributeError, ValueError):
            tensors = []
        if not tensors:
            return [TensorSpec(name="input-0", datatype="FP32", shape=[-1, -1])]
        return [
            TensorSpec(
                name=str(getattr(t, "name", None) or f"input-{i}"),
                datatype=_tf_datatype(t.dtype),
                shape=shape_of(t.shape),
            )
            for i, t in enumerate(tensors)
        ]

    @staticmethod
    def _infer_outputs(model: Any) -> list[TensorSpec]:
        try:
            tensors = list(model.outputs)
        except (AttributeError, ValueError):
            tensors = []
        if not tensors:
            return [TensorSpec(name="output-0", datatype="FP32", shape=[-1, -1])]
        # NOTE: Keras 3 names outputs "keras_tensor_N", which says nothing: number them.
        return [
            TensorSpec(name=f"output-{i}", datatype=_tf_datatype(t.dtype), shape=shape_of(t.shape))
            for i, t in enumerate(tensors)
        ]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = pick_inputs(self.inputs, inputs)
        result = self.model(arrays[0] if len(arrays) == 1 else arrays, training=False)
        converted = _to_numpy(self._keras, result)
        return to_numpy_outputs(converted, [o.name for o in self.outputs])


def _to_numpy(keras: Any, result: Any) -> Any:
    if isinstance(result, dict):
        return {k: _to_numpy(keras, v) for k, v in result.items()}
    if isinstance(result, list | tuple):
        return [_to_numpy(keras, v) for v in result]
    return keras.ops.convert_to_numpy(result)


class KerasFormat(Format, facts=FORMAT_FACTS["keras"]):
    """A Keras 3 ``.keras`` archive: checked by :mod:`.keras_guard`, then loaded in safe mode."""

    def detect(self, path: Path) -> bool:
        if not path.is_file() or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
        return "config.json" in names and "metadata.json" in names

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        path = primary_file(root, manifest, self.suffixes)
        check_keras_archive(path, policy, f"{manifest.name}:{manifest.version} ({path.name})")
        keras = require("keras", self.extra, self.name)
        model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
        return KerasPredictor(model, manifest.inputs, manifest.outputs)


class KerasH5Format(Format, facts=FORMAT_FACTS["keras-h5"]):
    """A legacy HDF5 Keras model; refused unless the policy allows it (no safe mode)."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_MAGIC

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        if not policy.allow_legacy_h5:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version} is a legacy Keras .h5 model, which Keras loads "
                f"without safe mode (lambda layers run code); it loads only when signed by a trusted "
                f"key, with the model in SERVING_UNRESTRICTED_MODELS and SERVING_ALLOW_LEGACY_H5=true; "
                f"or re-save it as .keras"
            )
        keras = require("keras", self.extra, self.name)
        path = primary_file(root, manifest, self.suffixes)
        model = keras.saving.load_model(str(path), compile=False)
        return KerasPredictor(model, manifest.inputs, manifest.outputs)


class SavedModelPredictor(Predictor):
    """Calls a SavedModel signature with keyword tensors; returns its output dict."""

    def __init__(self, loaded: Any, signature: Any, manifest: Manifest | None) -> None:
        import tensorflow as tf

        self._tf = tf
        self._loaded = loaded  # NOTE: keeps the variables the signature captures alive
        self.signature = signature
        _, kwargs = signature.structured_input_signature
        self._arg_dtypes = {name: spec.dtype for name, spec in kwargs.items()}
        inferred_in = [
            TensorSpec(name=name, datatype=_tf_datatype(spec.dtype), shape=shape_of(spec.shape))
            for name, spec in sorted(kwargs.items())
        ]
        outs = signature.structured_outputs
        inferred_out = (
            [
                TensorSpec(name=name, datatype=_tf_datatype(spec.dtype), shape=shape_of(spec.shape))
                for name, spec in sorted(outs.items())
            ]
            if isinstance(outs, dict)
            else [TensorSpec(name="output-0", datatype="FP32", shape=[-1, -1])]
        )
        self.inputs = (manifest.inputs if manifest else None) or inferred_in
        self.outputs = (manifest.outputs if manifest else None) or inferred_out

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = pick_inputs(self.inputs, inputs)
        feed = {
            spec.name: self._tf.constant(arr, dtype=self._arg_dtypes.get(spec.name))
            for spec, arr in zip(self.inputs, arrays, strict=True)
        }
        result = self.signature(**feed)
        return {str(k): np.asarray(v.numpy()) for k, v in result.items()}


def load_savedmodel(path: Path, manifest: Manifest | None = None) -> SavedModelPredictor:
    tf = require("tensorflow", "tensorflow", "savedmodel")
    loaded = tf.saved_model.load(str(path))
    signature_name = (manifest.options.get("signature") if manifest else None) or "serving_default"
    try:
        signature = loaded.signatures[signature_name]
    except KeyError as exc:
        raise LoadError(
            f"SavedModel at {path.name} has no {signature_name!r} signature "
            f"(it has {sorted(loaded.signatures.keys())})"
        ) from exc
    return SavedModelPredictor(loaded, signature, manifest)


class SavedModelFormat(Format, facts=FORMAT_FACTS["savedmodel"]):
    """A TensorFlow SavedModel directory, served through its ``serving_default`` signature."""

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "saved_model.pb").is_file()

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        subdir = manifest.options.get("dir")
        model_dir = root / check_relative_path(str(subdir)) if subdir else root
        if not (model_dir / "saved_model.pb").is_file():
            raise LoadError(f"{manifest.name}:{manifest.version} has no saved_model.pb")
        return load_savedmodel(model_dir, manifest)
