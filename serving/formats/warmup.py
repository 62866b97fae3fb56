"""Warm-up: run a version's example once and check its outputs against the manifest.

Both the serving process (:mod:`serving.runtime.slot`) and the isolation probe child
(:mod:`serving.isolation.prober`) warm a freshly loaded Predictor up with this before
it may serve.
"""

from __future__ import annotations

import numpy as np

from serving.errors import LoadError
from serving.manifest import Manifest, TensorSpec

from .base import Predictor, numpy_dtype

__all__ = ["warm_up"]


def warm_up(predictor: Predictor, manifest: Manifest) -> None:
    """Run the manifest's example and check outputs against the declared schema."""
    if manifest.example is None or len(predictor.inputs) != 1:
        return
    spec = predictor.inputs[0]
    batch = np.asarray(manifest.example, dtype=numpy_dtype(spec.datatype))
    outputs = predictor.predict({spec.name: batch})
    declared = {o.name: o for o in manifest.outputs or []}
    for name, spec_out in declared.items():
        if name not in outputs:
            raise LoadError(f"warm-up: output {name!r} declared in the manifest was not produced")
        _check_shape(outputs[name], spec_out, batch.shape[0])


def _check_shape(array: np.ndarray, spec: TensorSpec, rows: int) -> None:
    shape = list(array.shape)
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=False)
    ):
        raise LoadError(f"warm-up: output {spec.name!r} has shape {shape}, the manifest says {spec.shape}")
    if shape and shape[0] != rows:
        raise LoadError(f"warm-up: output {spec.name!r} has {shape[0]} rows for {rows} input rows")
