"""ONNX models on onnxruntime's CPU provider."""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from serving.errors import InvalidManifest, UntrustedArtifact
from serving.manifest import Manifest, TensorSpec

from ._common import pick_inputs, primary_file, require, shape_of
from .base import Format, LoadPolicy, Predictor
from .table import FORMAT_FACTS

# onnxruntime's type strings ("tensor(float)") -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _specs(args: list[Any]) -> list[TensorSpec]:
    return [
        TensorSpec(
            name=a.name,
            datatype=_ORT_TYPES.get(a.type, "FP32"),
            shape=shape_of(a.shape) if a.shape is not None else [-1],
        )
        for a in args
    ]


class OnnxPredictor(Predictor):
    def __init__(self, session: Any, manifest: Manifest) -> None:
        self.session = session
        self.inputs = manifest.inputs or _specs(session.get_inputs())
        # NOTE: non-tensor outputs (skl2onnx's ZipMap: a list of dicts) are not
        # representable in OIP; keep only tensors unless the manifest says otherwise.
        self.outputs = manifest.outputs or [
            s
            for s, a in zip(_specs(session.get_outputs()), session.get_outputs(), strict=True)
            if a.type.startswith("tensor(")
        ]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(inputs, [o.name for o in self.outputs])

    def predict_only(self, inputs: dict[str, np.ndarray], names: Collection[str]) -> dict[str, np.ndarray]:
        declared = [o.name for o in self.outputs]
        # NOTE: onnxruntime computes only the subgraph the fetched outputs need.
        known = set(declared).issuperset(names)
        return self._run(inputs, [n for n in declared if n in names] if known else declared)

    def _run(self, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        arrays = pick_inputs(self.inputs, inputs)
        feed = {spec.name: arr for spec, arr in zip(self.inputs, arrays, strict=True)}
        results = self.session.run(names, feed)
        return {name: np.asarray(r) for name, r in zip(names, results, strict=True)}

    def close(self) -> None:
        self.session = None


def _sparse_parts(graph: Any) -> list[Any]:
    """The values and indices tensors of every sparse tensor in ``graph`` and its subgraphs."""
    out: list[Any] = []
    sparse = list(graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("sparse_tensor"):
                sparse.append(attr.sparse_tensor)
            sparse.extend(attr.sparse_tensors)
            if attr.HasField("g"):
                out.extend(_sparse_parts(attr.g))
            for sub in attr.graphs:
                out.extend(_sparse_parts(sub))
    for st in sparse:
        out.extend((st.values, st.indices))
    return out


def check_external_data(model_path: Path, root: Path) -> None:
    """Refuse external-data locations outside the version directory.

    Raises:
        UntrustedArtifact: a location is absolute, contains ``..`` or resolves outside ``root``.
    """
    onnx = require("onnx", "onnx", "onnx")
    from onnx import external_data_helper

    model = onnx.load(str(model_path), load_external_data=False)
    base = model_path.parent
    # NOTE: onnx's helper skips sparse tensors, whose values and indices can name
    # external data too; onnxruntime refuses them today, but that is not a guarantee.
    tensors = [*external_data_helper._get_all_tensors(model), *_sparse_parts(model.graph)]
    for tensor in tensors:
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        posix, windows = PurePosixPath(location), PureWindowsPath(location)
        unsafe = (
            not location
            or posix.is_absolute()
            or windows.is_absolute()
            or windows.drive
            or ".." in posix.parts
            or ".." in windows.parts
            or not (base / location).resolve().is_relative_to(root.resolve())
        )
        if unsafe:
            raise UntrustedArtifact(
                f"{model_path.name}: tensor {tensor.name!r} reads external data from {location!r}, "
                f"outside the model version"
            )


def available_cpus() -> int:
    """The CPUs this process may use: its affinity (a pod's cpuset), capped by a cgroup CPU quota
    (a pod's CPU limit), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            words = Path(quota_file).read_text().split()
            quota, period = words[0], (words[1] if period_file is None else Path(period_file).read_text())
            if quota not in ("max", "-1"):
                cpus = min(cpus, math.ceil(int(quota) / int(period)))
                break
        except (OSError, ValueError, IndexError):
            continue
    return max(1, cpus)


class OnnxFormat(Format, facts=FORMAT_FACTS["onnx"]):
    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() == ".onnx"
        return path.is_dir() and len(list(path.glob("*.onnx"))) == 1

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        ort = require("onnxruntime", self.extra, self.name)
        path = primary_file(root, manifest, self.suffixes)
        check_external_data(path, root)
        options = ort.SessionOptions()
        threads = manifest.options.get("intra_op_num_threads")
        if threads is not None:
            limit = available_cpus()
            if isinstance(threads, bool) or not isinstance(threads, int) or not 0 < threads <= limit:
                raise InvalidManifest(
                    f"options.intra_op_num_threads is {threads!r:.40}; the limit is 1..{limit}, the CPUs "
                    "this process may use (a thread per request-time op beyond them only adds switching)"
                )
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        return OnnxPredictor(session, manifest)
