"""The one interface every format produces: a Predictor."""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.manifest import Manifest, TensorSpec

from .table import FormatFacts


@dataclass(frozen=True)
class LoadPolicy:
    """What loaders may trust. Widening it is an operator's explicit choice.

    Attributes:
        trusted_globals: extra ``module.qualname`` globals the restricted
            unpickler admits, on top of the built-in allowlist; the same names
            are the types a ``skops`` file may use beyond skops's own trusted ones.
        allow_legacy_h5: load Keras ``.h5`` files, which bypass safe mode.
        signed: a trusted key's signature over the manifest verified
            (set by :func:`serving.trust.check_trust`).
        allow_unrestricted: the version may use a format that runs code on
            load (arbitrary pickle, ``.h5``, SavedModel); only ever true for a
            signed version of a model the operator opted in.
        max_artifact_bytes: no file may expand (joblib's own compression, zip
            members of skops, Keras and torch files) past this many bytes.
        max_expansion_ratio: nor past this many times its size on disk
            (with a 64 MiB floor, so small files are never refused for it).
    """

    trusted_globals: frozenset[str] = field(default_factory=frozenset)
    allow_legacy_h5: bool = False
    signed: bool = False
    allow_unrestricted: bool = False
    max_artifact_bytes: int = 50 * 1024**3
    max_expansion_ratio: float = 100.0

    def to_json(self) -> dict[str, Any]:
        """This policy as JSON values (what a child process that loads the version is sent)."""
        return {**dataclasses.asdict(self), "trusted_globals": sorted(self.trusted_globals)}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> LoadPolicy:
        """The policy :meth:`to_json` wrote."""
        return cls(
            trusted_globals=frozenset(str(g) for g in doc["trusted_globals"]),
            allow_legacy_h5=bool(doc["allow_legacy_h5"]),
            signed=bool(doc["signed"]),
            allow_unrestricted=bool(doc["allow_unrestricted"]),
            max_artifact_bytes=int(doc["max_artifact_bytes"]),
            max_expansion_ratio=float(doc["max_expansion_ratio"]),
        )

    def expansion_limit(self, stored_bytes: int) -> int:
        """The most bytes a file of ``stored_bytes`` may decompress to."""
        by_ratio = int(self.max_expansion_ratio * stored_bytes)
        return min(self.max_artifact_bytes, max(_EXPANSION_FLOOR, by_ratio))


_EXPANSION_FLOOR = 64 * 1024**2


class Predictor(ABC):
    """A loaded model: named numpy inputs in, named numpy outputs out.

    ``inputs`` and ``outputs`` describe tensors in Open Inference Protocol terms
    (name, datatype, shape with -1 for any size).
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. Keys of ``inputs`` are the names in ``self.inputs``."""

    def predict_only(self, inputs: dict[str, np.ndarray], names: Collection[str]) -> dict[str, np.ndarray]:
        """Run one batch for the outputs in ``names`` (a request's ``outputs``).

        A predictor that can skip work skips the other outputs (an estimator's
        ``predict_proba`` when only ``predict`` is asked for); one that cannot
        computes all of them, and the codec drops the rest. Unknown names are the
        codec's to refuse, so they make a predictor compute everything.
        """
        return self.predict(inputs)

    @property
    def primary_output(self) -> str:
        """The output the v1 protocol's ``predictions`` carries (the first one produced)."""
        return self.outputs[0].name

    def predict_rows(self, rows: Any) -> dict[str, np.ndarray]:
        """Convenience for single-input models: a list of rows or an array."""
        if len(self.inputs) != 1:
            raise TypeError("predict_rows needs a model with exactly one input")
        spec = self.inputs[0]
        return self.predict({spec.name: np.asarray(rows, dtype=numpy_dtype(spec.datatype))})

    def close(self) -> None:  # noqa: B027 -- NOTE: optional hook; most formats free on GC
        """Release framework resources (sessions, graphs) when the version is retired."""


class Format(ABC):
    """How one artifact format is recognised, saved and loaded.

    A subclass names its row of :data:`serving.formats.table.FORMAT_FACTS`
    (``class OnnxFormat(Format, facts=FORMAT_FACTS["onnx"])``), which sets the
    attributes below.
    """

    name: str
    framework: str
    extra: str
    """The pip extra that installs this format's framework (named in errors)."""
    runs_code: bool = False
    """Loading it can run code the artifact carries (a graph or program, not just
    weights). ``load_predictor`` refuses such formats unless the policy says
    ``allow_unrestricted`` (a signed version the operator opted in)."""
    suffixes: tuple[str, ...] = ()
    """File extensions it loads."""
    frameworks: tuple[str, ...] = ()
    """Distributions that provide the framework, preferred first (defaults to ``framework``)."""

    def __init_subclass__(cls, facts: FormatFacts | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if facts is not None:
            cls.name, cls.framework, cls.extra = facts.name, facts.framework, facts.extra
            cls.runs_code, cls.suffixes, cls.frameworks = facts.runs_code, facts.suffixes, facts.frameworks

    def framework_version(self) -> str | None:
        """The first installed framework's version, recorded in manifests; None if absent."""
        for package in self.frameworks or (self.framework,):
            if (found := installed_version(package)) is not None:
                return found
        return None

    @abstractmethod
    def detect(self, path: Path) -> bool:
        """Whether ``path`` (a file or directory about to be published) is this format."""

    @abstractmethod
    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        """Load a verified version directory into a Predictor."""


# Open Inference Protocol datatypes <-> numpy dtypes.
OIP_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
}
NUMPY_TO_OIP: dict[str, str] = {v: k for k, v in OIP_TO_NUMPY.items()}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    return np.dtype(OIP_TO_NUMPY[datatype])


def oip_datatype(dtype: np.dtype[Any]) -> str:
    if dtype.kind in {"U", "S", "O"}:
        return "BYTES"
    return NUMPY_TO_OIP[str(dtype)]


@functools.cache
def installed_version(package: str) -> str | None:
    """The installed version of distribution ``package``, or None; read once per process."""
    # NOTE: importlib.metadata parses the package's METADATA with the email parser, 2.5 ms
    # a call, and every swap's isolation memo asks; what is installed does not change
    # while a process runs.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
