"""``serving.save``: publish a live model; ``serving.load``: get a Predictor back.

``save`` writes the model in its framework's native format into a temporary
directory and publishes it through :func:`serving.publish.publish_path`, the
same path the CLI uses. ``load`` resolves a reference, pulls the version
through the node-local cache and loads it under the settings' load policy.
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from serving.cache import LoaderCache
from serving.errors import InvalidRequest
from serving.formats import load_predictor
from serving.formats._common import require, spec_for
from serving.formats.base import Predictor, numpy_dtype
from serving.formats.table import FORMAT_FACTS
from serving.manifest import Manifest, ModelRef, TensorSpec
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings, get_settings
from serving.store import ObjectStore, open_store
from serving.trust import check_trust

__all__ = ["load", "save"]

StoreLike = str | Path | ObjectStore | Repository | None


def save(
    model: Any,
    name: str,
    version: str | None = None,
    store: StoreLike = None,
    alias: str | None = None,
    example: Any = None,
    **options: Any,
) -> Manifest:
    """Publish a live model as a new immutable version.

    The format follows the model: a scikit-learn estimator (or anything with
    ``predict``) is saved with joblib, a ``torch.nn.Module`` as a state dict plus
    its class path (or TorchScript / torch.export), a Keras model as ``.keras``,
    a ``tf.Module`` as a SavedModel, an ``onnx.ModelProto`` as ``.onnx``.

    Args:
        model: the trained model.
        name: the model name in the store.
        version: defaults to the next integer.
        store: a store URI, an ObjectStore or a Repository; defaults to ``SERVING_STORE``.
        alias: move this alias (for example ``"production"``) to the new version.
        example: a batch of input rows; fills the manifest's inputs, outputs and example.
        **options: ``init_kwargs`` (torch state dicts: the module's constructor
            arguments), ``torchscript=True``, ``export=True`` (torch),
            ``format="safetensors"`` (torch weights as safetensors, with the class path),
            ``format="pickle"`` or ``format="skops"`` (sklearn), ``compress`` (joblib level),
            ``metadata`` (free-form dict); anything else is stored in the
            manifest's ``options`` for the loader.

    Returns:
        The published manifest.

    Raises:
        InvalidRequest: the model cannot be saved as given (for example a torch
            class that is not importable, or a missing ``init_kwargs``).

    Example:
        >>> from sklearn.linear_model import LogisticRegression  # doctest: +SKIP
        >>> serving.save(model, "iris", store="/tmp/store", alias="production",
        ...              example=[[5.1, 3.5, 1.4, 0.2]])  # doctest: +SKIP
    """
    repo = _repository(store, get_settings())
    metadata = options.pop("metadata", None) or {}
    example_arr = None if example is None else np.asarray(example)
    with tempfile.TemporaryDirectory(prefix="serving-save-") as tmp:
        saved = _write(model, Path(tmp), example_arr, options)
        return publish_path(
            repo,
            saved.path,
            name,
            version=version,
            format=saved.format,
            alias=alias,
            inputs=saved.inputs,
            outputs=saved.outputs,
            example=example_arr.tolist() if example_arr is not None else None,
            options=saved.options,
            metadata=metadata,
        )


def load(ref: ModelRef | str, store: StoreLike = None, cache_dir: Path | str | None = None) -> Predictor:
    """Resolve ``name@alias`` / ``name:version``, pull it through the cache, load it.

    Trust is checked first (:func:`serving.trust.check_trust`): signatures when
    ``require_signature`` is on, and the load class of the format (SECURITY.md).

    Example:
        >>> predictor = serving.load("iris@production", store="/tmp/store")  # doctest: +SKIP
        >>> predictor.predict_rows([[5.1, 3.5, 1.4, 0.2]])["predict"]  # doctest: +SKIP
        array([0])
    """
    settings = get_settings()
    repo = _repository(store, settings)
    cache = LoaderCache.from_settings(settings, root=cache_dir)
    resolved, _ = cache.resolve(repo, ref)
    # NOTE: signatures and the load class are decided on the manifest, before any download.
    policy = check_trust(repo, resolved, settings, cache_root=cache.root).policy
    cached = cache.fetch(repo, resolved)
    # NOTE: pinned while the framework reads the files, so no other process evicts them.
    with cache.pin(cached):
        return load_predictor(cached.path, cached.manifest, policy)


def _repository(store: StoreLike, settings: Settings) -> Repository:
    if isinstance(store, Repository):
        return store
    if isinstance(store, ObjectStore):
        return Repository(store)
    return Repository(open_store(str(store) if store is not None else None, settings))


class _Saved:
    def __init__(
        self,
        path: Path,
        format: str,
        options: dict[str, Any],
        inputs: list[TensorSpec] | None = None,
        outputs: list[TensorSpec] | None = None,
    ) -> None:
        self.path, self.format, self.options = path, format, options
        self.inputs, self.outputs = inputs, outputs


def _model_file(tmp: Path, fmt: str) -> Path:
    """Where ``fmt`` is saved in ``tmp``: ``model`` with the format's first extension."""
    return tmp / f"model{FORMAT_FACTS[fmt].suffixes[0]}"


def _is_instance(model: Any, module: str, attr_path: str) -> bool:
    """``isinstance`` against a framework class, without importing an absent framework."""
    if module not in sys.modules:
        return False
    obj: Any = sys.modules[module]
    for part in attr_path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return isinstance(obj, type) and isinstance(model, obj)


def _write(model: Any, tmp: Path, example: np.ndarray | None, options: dict[str, Any]) -> _Saved:
    if _is_instance(model, "torch", "nn.Module"):
        return _write_torch(model, tmp, example, options)
    if _is_instance(model, "keras", "Model"):
        return _write_keras(model, tmp, example, options)
    if _is_instance(model, "tensorflow", "Module"):
        return _write_savedmodel(model, tmp, options)
    if _is_instance(model, "onnx", "ModelProto"):
        path = _model_file(tmp, "onnx")
        path.write_bytes(model.SerializeToString())
        # NOTE: the loader reads inputs and outputs from the ONNX graph itself.
        return _Saved(path, "onnx", options)
    if callable(getattr(model, "predict", None)):
        return _write_estimator(model, tmp, example, options)
    raise InvalidRequest(
        f"cannot save a {type(model).__module__}.{type(model).__qualname__}: expected a "
        f"scikit-learn estimator, torch.nn.Module, Keras model, tf.Module or onnx.ModelProto"
    )


def _outputs_from_run(predictor: Predictor, example: np.ndarray) -> tuple[list[TensorSpec], list[TensorSpec]]:
    spec = predictor.inputs[0]
    arr = example.astype(numpy_dtype(spec.datatype), copy=False) if spec.datatype != "BYTES" else example
    inputs = [spec_for(spec.name, arr)]
    results = predictor.predict({spec.name: arr})
    return inputs, [spec_for(k, np.asarray(v)) for k, v in results.items()]


def _write_estimator(model: Any, tmp: Path, example: np.ndarray | None, options: dict[str, Any]) -> _Saved:
    import pickle

    import joblib

    from serving.formats.pickled import EstimatorPredictor

    fmt = options.pop("format", "sklearn")
    compress = options.pop("compress", 0)
    if fmt == "pickle":
        path = _model_file(tmp, fmt)
        with open(path, "wb") as f:
            pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    elif fmt == "sklearn":
        path = _model_file(tmp, fmt)
        joblib.dump(model, path, compress=compress)
    elif fmt == "skops":
        path = _model_file(tmp, fmt)
        require("skops.io", FORMAT_FACTS[fmt].extra, fmt).dump(model, path)
    else:
        raise InvalidRequest(
            f"an estimator saves as format 'sklearn' (joblib), 'skops' or 'pickle', not {fmt!r}"
        )
    saved = _Saved(path, fmt, options)
    if example is not None:
        dtype = "BYTES" if example.dtype.kind in "OUS" else "FP64"
        spec = TensorSpec(name="input-0", datatype=dtype, shape=[-1, *example.shape[1:]])
        saved.inputs, saved.outputs = _outputs_from_run(EstimatorPredictor(model, [spec]), example)
    return saved


def _write_torch(model: Any, tmp: Path, example: np.ndarray | None, options: dict[str, Any]) -> _Saved:
    import torch

    from serving.formats.pytorch import TorchPredictor

    torchscript = bool(options.pop("torchscript", False))
    export = bool(options.pop("export", False))
    fmt = options.pop("format", None) or (
        "torch-export" if export else "torchscript" if torchscript else "torch-state-dict"
    )
    init_kwargs = options.pop("init_kwargs", None)
    model.eval()
    spec = TensorSpec(name="input-0", datatype="FP32", shape=[-1, -1])
    if example is not None:
        spec = TensorSpec(name="input-0", datatype="FP32", shape=[-1, *example.shape[1:]])
    if fmt == "torch-state-dict":
        options = {**options, **_module_class_options(model, init_kwargs)}
        path = _model_file(tmp, fmt)
        torch.save(model.state_dict(), path)
    elif fmt == "safetensors":
        options = {**options, **_module_class_options(model, init_kwargs)}
        path = _model_file(tmp, fmt)
        try:
            st = require("safetensors.torch", FORMAT_FACTS[fmt].extra, fmt)
            st.save_file(model.state_dict(), str(path))
        except (RuntimeError, ValueError) as exc:
            # NOTE: e.g. tied weights (two names, one storage), which safetensors refuses.
            raise InvalidRequest(f"safetensors cannot store this state dict: {exc}") from exc
    elif fmt == "torchscript":
        path = _model_file(tmp, fmt)
        try:
            scripted = torch.jit.script(model)
        except Exception as exc:
            if example is None:
                raise InvalidRequest(
                    f"torch.jit.script failed ({exc}); pass example= to trace the model instead"
                ) from exc
            example_tensor = torch.from_numpy(np.asarray(example, dtype=np.float32))
            scripted = torch.jit.trace(model, example_tensor)  # type: ignore[no-untyped-call]
        torch.jit.save(scripted, str(path))
    elif fmt == "torch-export":
        if example is None:
            raise InvalidRequest("export=True needs example= (torch.export traces the model with it)")
        x = torch.from_numpy(np.asarray(example, dtype=np.float32))
        if x.shape[0] < 2:
            # NOTE: torch.export specialises a batch of 1; two rows keep the batch dimension dynamic.
            x = torch.cat([x, x])
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
        path = _model_file(tmp, fmt)
        torch.export.save(program, str(path))
    else:
        raise InvalidRequest(
            f"a torch module saves as torch-state-dict, safetensors, torchscript or torch-export, not {fmt!r}"
        )
    saved = _Saved(path, fmt, options)
    if example is not None:
        saved.inputs, saved.outputs = _outputs_from_run(TorchPredictor(model, [spec], None), example)
    return saved


def _module_class_options(model: Any, init_kwargs: Any) -> dict[str, Any]:
    """``class_path`` and ``init_kwargs`` for a weights-only save, checked as the loader will."""
    from serving.formats.pytorch import import_module_class

    cls = type(model)
    class_path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise InvalidRequest(
            f"{cls.__qualname__} is defined in {cls.__module__!r}, which a server cannot import: "
            f"move it into an installed module, or save with torchscript=True or export=True"
        )
    checked = _check_init_kwargs(cls, init_kwargs)
    try:
        import_module_class(class_path)
    except Exception as exc:
        raise InvalidRequest(f"cannot save {class_path}: {exc}") from exc
    return {"class_path": class_path, "init_kwargs": checked}


def _check_init_kwargs(cls: type, given: Any) -> dict[str, Any]:
    init_kwargs: dict[str, Any] = dict(given or {})
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        params = []  # NOTE: no introspectable signature: trust the caller
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in init_kwargs
    ]
    if required:
        raise InvalidRequest(
            f"{cls.__qualname__}() needs {required}: pass init_kwargs={{...}} with the constructor "
            f"arguments, so the server can rebuild the module before loading its state dict"
        )
    try:
        json.dumps(init_kwargs)
    except TypeError as exc:
        raise InvalidRequest(f"init_kwargs must be JSON values: {exc}") from exc
    return init_kwargs


def _write_keras(model: Any, tmp: Path, example: np.ndarray | None, options: dict[str, Any]) -> _Saved:
    from serving.formats.keras_tf import KerasPredictor

    path = _model_file(tmp, "keras")
    model.save(str(path))
    saved = _Saved(path, "keras", options)
    predictor = KerasPredictor(model, None, None)
    saved.inputs, saved.outputs = predictor.inputs, predictor.outputs
    if example is not None and len(predictor.inputs) == 1:
        saved.inputs, saved.outputs = _outputs_from_run(predictor, example)
    return saved


def _write_savedmodel(model: Any, tmp: Path, options: dict[str, Any]) -> _Saved:
    import tensorflow as tf

    from serving.formats.keras_tf import load_savedmodel

    path = tmp / "savedmodel"
    signatures = options.pop("signatures", None)
    tf.saved_model.save(model, str(path), signatures=signatures)
    predictor = load_savedmodel(path)
    return _Saved(path, "savedmodel", options, predictor.inputs, predictor.outputs)
