"""What a ``.keras`` archive may hold: checked before Keras reads a byte of it.

Keras's own safe mode refuses Python bytecode, and otherwise admits any symbol
Keras exports, less a denylist: a ``Lambda`` layer over ``keras.ops.zeros`` with
a literal shape, over a ``keras.applications`` constructor (which downloads
weights) or over ``keras.config.set_epsilon`` (which changes every other Keras
model in the process) all pass it. This module admits exact names instead:

- every object in ``config.json`` (anything with a ``class_name``) must be one
  of :data:`OBJECTS`, by module and class name; a function (``class_name:
  "function"``) must be one of :data:`FUNCTIONS`, which are activations. A
  ``Lambda`` layer, a custom (registered) object and anything else is refused
  unless the version is signed by a trusted key and the operator opted the
  model in (``LoadPolicy.allow_unrestricted``);
- layers whose arguments set what each request costs (``RepeatVector(n)``,
  ``UpSampling2D(size)``, ``ZeroPadding2D(padding)``, ``Resizing``) are bounded,
  one layer by :data:`MAX_REPEAT` and the model's product by :data:`MAX_REPEATS`;
- ``model.weights.h5`` may hold only plain numeric datasets stored in full in
  the file: no dataset declared larger than the bytes it stores (HDF5 reads
  the missing part back as its fill value, so 20 KB could declare 1.7 GB), no
  external, virtual or linked storage (which reads other files), and no more
  than the policy's expansion limit in all.

The archive may hold only ``metadata.json``, ``config.json``,
``model.weights.h5`` and ``assets/`` files. Each refusal names the attribute
and the limit (:class:`serving.errors.UntrustedArtifact`).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import LoadError, UntrustedArtifact

from ._common import check_zip_expansion
from .base import LoadPolicy

__all__ = [
    "FUNCTIONS",
    "MAX_IMAGE",
    "MAX_REPEAT",
    "MAX_REPEATS",
    "MAX_WIDTH",
    "OBJECTS",
    "check_keras_archive",
]

_LAYERS = [
    "InputLayer",
    "Input",
    "Dense",
    "EinsumDense",
    "Dropout",
    "Activation",
    "Flatten",
    "Reshape",
    "Permute",
    "Identity",
    "Masking",
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "UnitNormalization",
    "Normalization",
    "Rescaling",
    "CenterCrop",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "SeparableConv1D",
    "SeparableConv2D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
    "Maximum",
    "Minimum",
    "Concatenate",
    "Dot",
    "Embedding",
    "LSTM",
    "GRU",
    "SimpleRNN",
    "LSTMCell",
    "GRUCell",
    "SimpleRNNCell",
    "Bidirectional",
    "TimeDistributed",
    "Attention",
    "AdditiveAttention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "ReLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Softmax",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "SpatialDropout3D",
    "ActivityRegularization",
    "CategoryEncoding",
    "Discretization",
    "HashedCrossing",
    "Hashing",
    "RepeatVector",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "Resizing",
    "RNN",
    "StackedRNNCells",
    "ConvLSTM1D",
    "ConvLSTM2D",
    "ConvLSTM3D",
    "RMSNormalization",
    "TextVectorization",
    "StringLookup",
    "IntegerLookup",
    # NOTE: augmentation layers are the identity at inference (training=False, enforced below).
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "RandomCrop",
]

OBJECTS: frozenset[tuple[str, str]] = frozenset(
    [("keras.layers", name) for name in _LAYERS]
    + [
        ("keras", "Sequential"),
        ("keras", "Functional"),
        ("keras", "Model"),
        ("keras.src.models.functional", "Functional"),
        ("keras.src.models.sequential", "Sequential"),
        ("keras", "DTypePolicy"),
        ("keras", "FloatDTypePolicy"),
    ]
    + [
        ("keras.initializers", name)
        for name in [
            "Zeros",
            "Ones",
            "Constant",
            "RandomNormal",
            "RandomUniform",
            "TruncatedNormal",
            "Identity",
            "Orthogonal",
            "GlorotUniform",
            "GlorotNormal",
            "HeUniform",
            "HeNormal",
            "LecunUniform",
            "LecunNormal",
            "VarianceScaling",
        ]
    ]
    + [("keras.regularizers", name) for name in ("L1", "L2", "L1L2", "OrthogonalRegularizer")]
    + [("keras.constraints", name) for name in ("MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm")]
)
"""(module, class name) pairs a ``.keras`` config may build, exactly."""

FUNCTIONS: frozenset[str] = frozenset(
    [
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "gelu",
        "silu",
        "swish",
        "mish",
        "sigmoid",
        "hard_sigmoid",
        "hard_silu",
        "hard_swish",
        "tanh",
        "softmax",
        "log_softmax",
        "softplus",
        "softsign",
        "linear",
        "exponential",
    ]
)
"""Functions a config may name (``class_name: "function"``): activations only."""

_FUNCTION_MODULES = frozenset({"builtins", "keras.activations"})
_INTERNAL = frozenset(
    {"__keras_tensor__", "__tuple__", "__numpy__", "__tensor__", "__ellipsis__", "__slice__"}
)
"""Keras's own value encodings: a tensor reference, a tuple, a literal array."""

MAX_REPEAT = 4096
"""How much one repeating layer (``RepeatVector``, ``UpSampling*``) may multiply each request."""
MAX_REPEATS = 1 << 18
"""How much all of them together may: the product over the model (a 7-level U-Net's decoder
is 4**7 = 16,384; chaining layers each under :data:`MAX_REPEAT` is not a way around it)."""
MAX_WIDTH = 1 << 20
"""The widest output a layer may be configured to (one-hot and count encodings, hashing
bins, sequence lengths), and the most a padding may add."""
MAX_IMAGE = 1 << 24
"""The most pixels a ``Resizing`` or ``CenterCrop`` may produce."""

_REPEATS = {
    "RepeatVector": ("n",),
    "UpSampling1D": ("size",),
    "UpSampling2D": ("size",),
    "UpSampling3D": ("size",),
}
_WIDTHS = {
    "ZeroPadding1D": ("padding",),
    "ZeroPadding2D": ("padding",),
    "ZeroPadding3D": ("padding",),
    "CategoryEncoding": ("num_tokens",),
    "Hashing": ("num_bins",),
    "HashedCrossing": ("num_bins",),
    "TextVectorization": ("max_tokens", "output_sequence_length"),
    "StringLookup": ("max_tokens",),
    "IntegerLookup": ("max_tokens",),
}
_IMAGES = {"Resizing": ("height", "width"), "CenterCrop": ("height", "width")}
_VALUE_DTYPES = frozenset("biuf")
"""What a literal array in the config (``__numpy__``, ``__tensor__``) may hold: numbers. A
``U400000000`` string dtype made one short config value a 1.6 GB array."""
_MEMBERS = frozenset({"metadata.json", "config.json", "model.weights.h5"})
_MAX_CONFIG_BYTES = 16 * 1024**2
_MAX_DEPTH = 200
_MAX_H5_OBJECTS = 100_000
_SKIPPED_KEYS = frozenset({"compile_config"})
"""Read only by ``compile=True``, which this project never passes."""


def check_keras_archive(path: Path, policy: LoadPolicy, source: str) -> None:
    """Refuse ``path`` unless every object and weight in it is one this module admits.

    Raises:
        UntrustedArtifact: names the member, the attribute path and the limit.
        LoadError: the archive or a member cannot be read.
    """
    check_zip_expansion(path, policy.expansion_limit(path.stat().st_size))
    try:
        with zipfile.ZipFile(path) as z:
            infos = {info.filename: info for info in z.infolist()}
            for name in infos:
                if name not in _MEMBERS and not (name.startswith("assets/") and ".." not in name.split("/")):
                    raise UntrustedArtifact(
                        f"{source}: the archive holds {name!r}, which a .keras model does not"
                    )
            config_info = infos.get("config.json")
            if config_info is None:
                raise LoadError(f"{source}: the archive has no config.json")
            if config_info.file_size > _MAX_CONFIG_BYTES:
                raise UntrustedArtifact(
                    f"{source}: config.json declares {config_info.file_size} bytes, over the limit of "
                    f"{_MAX_CONFIG_BYTES}"
                )
            config = json.loads(z.read(config_info))
            weights = infos.get("model.weights.h5")
            if not policy.allow_unrestricted:
                _check_config(config, source)
            if weights is not None:
                limit = policy.expansion_limit(path.stat().st_size)
                if weights.file_size > limit:
                    raise UntrustedArtifact(
                        f"{source}: model.weights.h5 declares {weights.file_size} bytes, "
                        f"over the limit of {limit}"
                    )
                _check_weights(z.read(weights), limit, source)
    except (zipfile.BadZipFile, OSError, ValueError, RecursionError) as exc:
        raise LoadError(f"{source} is not a readable .keras archive: {exc}") from exc


def _objects(node: Any, where: str, source: str, depth: int = 0) -> Iterator[tuple[dict[str, Any], str]]:
    if depth > _MAX_DEPTH:
        raise UntrustedArtifact(
            f"{source}: config.json nests deeper than {_MAX_DEPTH} levels at {where[:200]}"
        )
    if isinstance(node, dict):
        if "class_name" in node:
            yield node, where
        for key, value in node.items():
            if key not in _SKIPPED_KEYS:
                yield from _objects(value, f"{where}.{key}", source, depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{where}[{i}]", source, depth + 1)


def _check_config(config: Any, source: str) -> None:
    repeats = 1.0
    for obj, where in _objects(config, "config", source):
        class_name, module = obj.get("class_name"), obj.get("module")
        if not isinstance(class_name, str):
            raise UntrustedArtifact(f"{source}: {where}.class_name is not a string")
        if class_name in _INTERNAL:
            _check_value(obj, where, source)
            continue
        if class_name == "function":
            name = obj.get("config")
            if module not in _FUNCTION_MODULES or name not in FUNCTIONS:
                raise UntrustedArtifact(
                    f"{source}: {where} names the function {module}.{name}; a .keras config may name only "
                    f"activations ({', '.join(sorted(FUNCTIONS))}) unless the version is signed and the "
                    "model is in SERVING_UNRESTRICTED_MODELS"
                )
            continue
        registered = obj.get("registered_name")
        if (module, class_name) not in OBJECTS or registered not in (None, class_name):
            if class_name == "Lambda":
                why = "a Lambda layer calls whatever function its config names"
            elif registered not in (None, class_name):
                why = f"it is registered as {registered!r}, a custom object Keras looks up before the module"
            else:
                why = "not a built-in Keras layer, initializer, regularizer or constraint this server admits"
                why = f"it is {why}"
            raise UntrustedArtifact(
                f"{source}: {where} is {module}.{class_name}: {why}; it loads only when the version is "
                "signed by a trusted key and the model is in SERVING_UNRESTRICTED_MODELS"
            )
        config_of = obj.get("config")
        layer: dict[str, Any] = config_of if isinstance(config_of, dict) else {}
        _check_calls(obj, where, source)
        for argument in _WIDTHS.get(class_name, ()):
            widest = max(_numbers(layer.get(argument)), default=0.0)
            _bound(widest, MAX_WIDTH, f"{where}.config.{argument}", source)
        if class_name in _IMAGES:
            height, width = _IMAGES[class_name]
            pixels = math.prod(max(_numbers(layer.get(a)), default=1.0) for a in (height, width))
            _bound(pixels, MAX_IMAGE, f"{where}.config.{height} x {width}", source)
        for argument in _REPEATS.get(class_name, ()):
            factor = math.prod(max(abs(n), 1.0) for n in _numbers(layer.get(argument)))
            _bound(factor, MAX_REPEAT, f"{where}.config.{argument}", source)
            repeats *= factor
            _bound(repeats, MAX_REPEATS, f"{where}.config.{argument} (times the repeats before it)", source)


def _bound(value: float, limit: float, where: str, source: str) -> None:
    if not -limit <= value <= limit:
        raise UntrustedArtifact(
            f"{source}: {where} is {value:g}, over the limit of {limit:g} (it sets what each request costs)"
        )


def _check_value(obj: dict[str, Any], where: str, source: str) -> None:
    """A literal array must hold numbers: its dtype, not the config's text, sets its size."""
    if obj.get("class_name") not in ("__numpy__", "__tensor__"):
        return
    config = obj.get("config")
    dtype = config.get("dtype") if isinstance(config, dict) else None
    try:
        parsed = np.dtype(str(dtype))
    except (TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.kind not in _VALUE_DTYPES or parsed.itemsize > 16:
        raise UntrustedArtifact(
            f"{source}: {where} is an array of dtype {dtype!r}; literal arrays hold numbers"
        )


_RECORDS_TRAINING = frozenset(
    {"Resizing", "CenterCrop"} | {name for name in _LAYERS if name.startswith("Random")}
)
"""Layers whose call signature defaults to ``training=True``, which Keras records in every
functional model that uses them; the server calls the model with ``training=False``, which
wins, so for them a recorded ``True`` (a plain boolean) is admitted."""


def _check_calls(layer: dict[str, Any], where: str, source: str) -> None:
    """No layer may be called with ``training`` on: Dropout and augmentation would then change
    every answer at inference."""
    admitted: tuple[object, ...] = (None, False)
    if layer.get("class_name") in _RECORDS_TRAINING:
        admitted = (None, False, True)
    for i, node in enumerate(layer.get("inbound_nodes") or []):
        kwargs = node.get("kwargs") if isinstance(node, dict) else None
        training = kwargs.get("training") if isinstance(kwargs, dict) else None
        if isinstance(kwargs, dict) and not any(training is a for a in admitted):
            raise UntrustedArtifact(
                f"{source}: {where}.inbound_nodes[{i}] calls the layer with training={kwargs['training']!r}; "
                "a served model runs in inference mode"
            )


def _numbers(value: Any) -> Iterator[float]:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _numbers(item)


def _check_weights(data: bytes, limit: int, source: str) -> None:
    import h5py

    declared_total = 0
    with h5py.File(io.BytesIO(data), "r") as f:
        for name, link, obj in _walk(f, source):
            where = f"model.weights.h5:{name}"
            if not isinstance(link, h5py.HardLink):
                raise UntrustedArtifact(f"{source}: {where} is a link; weights must be stored in place")
            if not isinstance(obj, h5py.Dataset):
                continue
            if obj.dtype.kind not in "biuf":
                raise UntrustedArtifact(f"{source}: {where} has dtype {obj.dtype}, not a number")
            if obj.is_virtual or obj.external:
                raise UntrustedArtifact(f"{source}: {where} reads its data from another file")
            if obj.id.get_create_plist().get_nfilters():
                raise UntrustedArtifact(
                    f"{source}: {where} is filtered (compressed), which Keras never writes"
                )
            declared = obj.dtype.itemsize * math.prod(obj.shape or ())
            stored = obj.id.get_storage_size()
            if stored < declared:
                raise UntrustedArtifact(
                    f"{source}: {where} declares {declared} bytes (shape {obj.shape}) but stores {stored}; "
                    "the rest would read back as a fill value"
                )
            declared_total += declared
    if declared_total > limit:
        raise UntrustedArtifact(
            f"{source}: model.weights.h5 declares {declared_total} bytes of weights, "
            f"over the limit of {limit} (see SERVING_MAX_EXPANSION_RATIO)"
        )


def _walk(
    group: Any, source: str, prefix: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, Any, Any]]:
    """Every member under ``group`` once, with the link that names it; follows hard links only."""
    import h5py

    seen = set() if seen is None else seen
    for key in group:
        name = f"{prefix}{key}"
        link = group.get(key, getlink=True)
        obj = group[key] if isinstance(link, h5py.HardLink) else None
        if obj is not None:
            if hash(obj.id) in seen:
                raise UntrustedArtifact(f"{source}: model.weights.h5:{name} links to an object already seen")
            seen.add(hash(obj.id))
            if len(seen) > _MAX_H5_OBJECTS:
                raise UntrustedArtifact(
                    f"{source}: model.weights.h5 holds more than {_MAX_H5_OBJECTS} objects"
                )
        yield name, link, obj
        if isinstance(obj, h5py.Group):
            yield from _walk(obj, source, f"{name}/", seen)
