"""A loaded version converted to ONNX: scikit-learn through ``skl2onnx``, PyTorch through
``torch.onnx.export``.

:func:`to_onnx` takes a predictor that :func:`serving.formats.load_predictor` loaded (the
safe way: through the allowlist) and returns the ONNX model's bytes, with the graph's
inputs and outputs named as the source's, so a client sees the same schema: a classifier's
``label`` becomes ``predict`` and its ``probabilities`` ``predict_proba``; a regressor's
``variable`` becomes ``predict``, reshaped to the source's rank. An output the converter
does not produce (``decision_function``) is left out, and said so.

Keras models convert through ``tf2onnx``'s ``from_function`` over the model's call
(its ``from_keras`` does not take Keras 3 models).

It runs where the source was loaded: in a model worker (``serving.isolation.worker``,
op ``convert``), never in the process that asked for it. Checking the result against
the source is the caller's (``serving.convert``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import InvalidRequest
from serving.formats.base import Predictor

__all__ = ["QUANTIZATIONS", "Converted", "NoConverter", "quantize", "to_onnx"]

QUANTIZATIONS = ("int8", "fp16")
"""``int8``: onnxruntime's dynamic quantization (weights of MatMul and Gemm to int8, activations
quantized at run time); ``fp16``: every float tensor to float16, inputs and outputs kept float32."""

OPSET = 17
"""The ONNX opset the converters target (onnxruntime 1.20 and later run it)."""

_SKLEARN_NAMES = {
    "label": "predict",
    "output_label": "predict",
    "probabilities": "predict_proba",
    "variable": "predict",
}


class NoConverter(InvalidRequest):
    """The version's model cannot be converted (no converter for it, or the converter failed)."""


@dataclass
class Converted:
    """An ONNX model converted from a source version."""

    model: bytes
    converter: str
    converter_version: str
    outputs: list[str]
    """The source's outputs the ONNX model computes, by their names in the source."""
    left_out: list[str] = field(default_factory=list)
    """The source's outputs it does not."""


def to_onnx(predictor: Predictor, example: np.ndarray) -> Converted:
    """Convert the model behind ``predictor`` (loaded in this process) to ONNX.

    Raises:
        NoConverter: the model is neither a scikit-learn estimator nor a torch module, or
            its converter refuses it.
    """
    from serving.formats.pickled import EstimatorPredictor
    from serving.formats.pytorch import TorchPredictor

    if isinstance(predictor, EstimatorPredictor):
        return _sklearn(predictor, example)
    if isinstance(predictor, TorchPredictor):
        return _torch(predictor, example)
    if type(predictor).__name__ == "KerasPredictor":
        # NOTE: by name: importing serving.formats.keras_tf here would import TensorFlow.
        return _keras(predictor, example)
    kind = type(predictor).__name__.removesuffix("Predictor") or type(predictor).__name__
    raise NoConverter(
        f"no ONNX converter for a {kind} version: scikit-learn estimators and pipelines (skl2onnx), "
        "PyTorch modules (torch.onnx.export) and Keras models (tf2onnx) convert"
    )


def _final(model: Any) -> Any:
    steps = getattr(model, "steps", None)
    return _final(steps[-1][1]) if steps else model


def _sklearn(predictor: Any, example: np.ndarray) -> Converted:
    import onnx
    import skl2onnx
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
    from sklearn.base import is_classifier

    model = predictor.model
    spec = predictor.inputs[0] if predictor.inputs else None
    width = int(example.shape[1]) if example.ndim == 2 else None
    if example.ndim != 2:
        raise NoConverter("a scikit-learn version converts from a 2-D example (rows of features)")
    final = _final(model)
    # NOTE: probabilities as a tensor, not ZipMap's list of maps; classifiers whose converter
    # has no such option (LinearSVC) refuse it, and are converted without.
    tries: list[Any] = [{id(final): {"zipmap": False}}, None] if is_classifier(final) else [None]
    double = spec.datatype == "FP64" if spec is not None else example.dtype == np.float64
    types = [DoubleTensorType, FloatTensorType] if double else [FloatTensorType]
    last: Exception | None = None
    onx = None
    for tensor_type, options in [(t, o) for t in types for o in tries]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onx = skl2onnx.convert_sklearn(
                    model,
                    initial_types=[("X", tensor_type([None, width]))],
                    options=options,
                    target_opset=OPSET,
                )
            break
        except Exception as exc:  # noqa: BLE001 -- NOTE: every converter failure is a refusal
            last = exc
    if onx is None:
        raise NoConverter(
            f"skl2onnx cannot convert {type(model).__name__}: {type(last).__name__}: {str(last)[:300]}"
        ) from last
    input_name = spec.name if spec is not None else "input-0"
    renames = {"X": input_name}
    produced: list[str] = []
    declared = {s.name for s in predictor.outputs}
    for out in list(onx.graph.output):
        target = _SKLEARN_NAMES.get(out.name)
        if target is None or target in produced or target not in declared:
            # NOTE: an output the source does not answer (an SVC without probabilities still
            # gets skl2onnx's `probabilities`, which are scores): not part of the schema.
            onx.graph.output.remove(out)
            continue
        renames[out.name] = target
        produced.append(target)
    if not produced:
        raise NoConverter(f"skl2onnx's outputs for {type(model).__name__} match none of the source's")
    _rename(onx.graph, renames)
    source_ranks = {s.name: len(s.shape) for s in predictor.outputs}
    for out in list(onx.graph.output):
        if source_ranks.get(out.name) == 1 and len(out.type.tensor_type.shape.dim) == 2:
            _flatten_output(onx, out.name)
    onnx.checker.check_model(onx)
    return Converted(
        model=onx.SerializeToString(),
        converter="skl2onnx",
        converter_version=skl2onnx.__version__,
        outputs=produced,
        left_out=[s.name for s in predictor.outputs if s.name not in produced],
    )


def _rename(graph: Any, renames: dict[str, str]) -> None:
    """Rename values everywhere in ``graph`` (inputs, outputs, every node's ends)."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]


def _flatten_output(onx: Any, name: str) -> None:
    """Reshape output ``name`` from ``[N, 1]`` to ``[N]``, as the source answers it."""
    from onnx import TensorProto, helper

    wide = f"{name}__2d"
    _rename(onx.graph, {name: wide})
    for out in onx.graph.output:
        if out.name == wide:
            elem = out.type.tensor_type.elem_type
            out.CopyFrom(helper.make_tensor_value_info(name, elem, [None]))
    shape = helper.make_tensor(f"{name}__shape", TensorProto.INT64, [1], [-1])
    onx.graph.initializer.append(shape)
    onx.graph.node.append(helper.make_node("Reshape", [wide, shape.name], [name], name=f"{name}__flatten"))


def _torch(predictor: Any, example: np.ndarray) -> Converted:
    import torch
    from torch.jit._trace import TracerWarning

    module = predictor.module
    inputs = [s.name for s in predictor.inputs] or ["input-0"]
    outputs = [s.name for s in predictor.outputs] or ["output-0"]
    if len(inputs) != 1:
        raise NoConverter("a torch version converts with one input")
    sample = torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32))
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # NOTE: a trace keeps the branch and the sizes of the example it ran on; torch warns
            # when it had to (a tensor read as a Python number or bool): that is a refusal.
            warnings.simplefilter("error", TracerWarning)
            # NOTE: the TorchScript-based exporter: the torch.export-based one needs onnxscript,
            # which no extra of this project carries.
            torch.onnx.export(
                module,
                (sample,),
                buffer,  # type: ignore[arg-type]  # NOTE: the TorchScript exporter writes to any file object
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=OPSET,
            )
    except Exception as exc:  # NOTE: every exporter failure is a refusal
        name, why = type(module).__name__, f"{type(exc).__name__}: {str(exc)[:300]}"
        raise NoConverter(f"torch.onnx.export cannot convert {name}: {why}") from exc
    return Converted(
        model=buffer.getvalue(),
        converter="torch.onnx.export",
        converter_version=torch.__version__,
        outputs=outputs,
    )


def _keras(predictor: Any, example: np.ndarray) -> Converted:
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise NoConverter(f"converting a Keras version needs tf2onnx (the tensorflow extra): {exc}") from exc
    model = predictor.model
    inputs = [s.name for s in predictor.inputs]
    outputs = [s.name for s in predictor.outputs]
    if len(inputs) != 1 or len(outputs) != 1:
        raise NoConverter("a Keras version converts with one input and one output")
    spec = tf.TensorSpec((None, *example.shape[1:]), tf.float32, name="x")

    def call(x: Any) -> Any:
        return model(x, training=False)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onx, _ = tf2onnx.convert.from_function(tf.function(call), input_signature=(spec,), opset=OPSET)
    except Exception as exc:  # NOTE: every converter failure is a refusal
        name, why = type(model).__name__, f"{type(exc).__name__}: {str(exc)[:300]}"
        raise NoConverter(f"tf2onnx cannot convert {name}: {why}") from exc
    renames = {onx.graph.input[0].name: inputs[0], onx.graph.output[0].name: outputs[0]}
    _rename(onx.graph, renames)
    return Converted(
        model=onx.SerializeToString(),
        converter="tf2onnx",
        converter_version=tf2onnx.__version__,
        outputs=outputs,
    )


def quantize(source: str, how: str, workdir: str | None = None) -> Converted:
    """The ONNX model in file ``source``, quantized (``int8`` or ``fp16``, :data:`QUANTIZATIONS`);
    the quantizer's own files go under ``workdir``.

    Raises:
        NoConverter: an unknown quantization, or the quantizer refuses the model.
    """
    import onnx

    if how not in QUANTIZATIONS:
        raise NoConverter(f"unknown quantization {how!r}: {', '.join(QUANTIZATIONS)}")
    import contextlib
    import logging
    import tempfile

    quiet = io.StringIO()
    try:
        # NOTE: the quantizers print and log what they skip (whole graphs); the caller says
        # what matters, in one line.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
            tempfile.TemporaryDirectory(prefix="serving-quantize-", dir=workdir) as scratch,
        ):
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            if how == "int8":
                import onnxruntime
                from onnxruntime.quantization import QuantType, quantize_dynamic

                target = f"{scratch}/model.onnx"
                quantize_dynamic(source, target, weight_type=QuantType.QInt8)
                model = onnx.load(target)
                tool, version = "onnxruntime.quantization.quantize_dynamic", onnxruntime.__version__
            else:
                import onnxconverter_common
                from onnxconverter_common import float16

                model = float16.convert_float_to_float16(onnx.load(source), keep_io_types=True)
                tool, version = "onnxconverter_common.float16", onnxconverter_common.__version__
    except NoConverter:
        raise
    except Exception as exc:  # NOTE: every quantizer failure is a refusal
        raise NoConverter(f"cannot quantize to {how}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        logging.disable(logging.NOTSET)
    return Converted(
        model=model.SerializeToString(),
        converter=tool,
        converter_version=version,
        outputs=[o.name for o in model.graph.output],
    )
