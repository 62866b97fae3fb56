"""One table of what is known about each format, read by everything that needs a fact about one.

The format classes (:mod:`serving.formats`) take their name, framework, pip
extra and file extensions from it; :mod:`serving.trust` its load class;
:mod:`serving.hardening` the packages whose minimum versions it checks;
:mod:`serving.isolation.prober` whether ``isolation: auto`` isolates it and what the
helper imports ahead of a probe; :mod:`serving.save` and
:mod:`serving.mlflow_import` its file extensions. Nothing here imports a framework.

Example:
    >>> FORMAT_FACTS["sklearn"].suffixes  # doctest: +SKIP
    ('.joblib', '.jbl')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FORMAT_FACTS", "MIN_VERSIONS", "FormatFacts", "LoadClass"]

LoadClass = Literal["safe", "restricted", "unrestricted"]
"""How far a format's loader can be trusted with hostile bytes (SECURITY.md)."""


@dataclass(frozen=True)
class FormatFacts:
    """The facts about one format (the manifest's ``format`` field is ``name``).

    Attributes:
        frameworks: the distributions that provide its framework, preferred first;
            the first is named in messages, the first installed one's version is
            recorded in manifests.
        extra: the pip extra that installs the framework (named in errors).
        suffixes: file extensions it loads, the one :func:`serving.save` writes first;
            empty for a directory format.
        load_class: ``safe``, ``restricted`` or ``unrestricted`` (runs code when loaded).
        checked_packages: packages that must meet :data:`MIN_VERSIONS` before a load.
        preload: modules the isolation helper imports once, before its first fork.
        warm_packages: after a pass, the helper also imports what the probe child
            imported under these packages, so the next probe does not pay for it.
        worker_preload: modules a model worker (a fresh process, never forked) imports
            before it confines itself, besides ``preload``: TensorFlow maps more address
            space when imported than a version's budget leaves.
    """

    name: str
    frameworks: tuple[str, ...]
    extra: str
    suffixes: tuple[str, ...]
    load_class: LoadClass
    checked_packages: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    warm_packages: tuple[str, ...] = ()
    worker_preload: tuple[str, ...] = ()

    @property
    def framework(self) -> str:
        return self.frameworks[0]

    @property
    def runs_code(self) -> bool:
        """Loading it can run code the artifact carries (a graph or program, not just weights)."""
        return self.load_class == "unrestricted"


_SKLEARN_PRELOAD = ("numpy", "scipy", "sklearn", "sklearn.base")
_SKLEARN_WARM = ("numpy", "scipy", "sklearn", "joblib", "threadpoolctl")
_TORCH_STATE = (".pt", ".pth", ".bin")

# NOTE: no TensorFlow preload for the keras formats: it starts threads when imported, and
# forking a process with threads is unsafe; they import it in each probe child instead.
FORMAT_FACTS: dict[str, FormatFacts] = {
    f.name: f
    for f in (
        FormatFacts(
            "sklearn",
            ("scikit-learn",),
            "sklearn",
            (".joblib", ".jbl"),
            "restricted",  # joblib through the restricted unpickler
            preload=("numpy", "scipy", "joblib", "sklearn", "sklearn.base"),
            warm_packages=_SKLEARN_WARM,
        ),
        FormatFacts(
            "pickle",
            ("scikit-learn",),
            "sklearn",
            (".pkl", ".pickle", ".pck"),
            "restricted",  # plain pickle through the restricted unpickler
            preload=_SKLEARN_PRELOAD,
            warm_packages=_SKLEARN_WARM,
        ),
        FormatFacts(
            "skops",
            ("scikit-learn",),
            "skops",
            (".skops",),
            "safe",
            checked_packages=("skops",),
            preload=(*_SKLEARN_PRELOAD, "skops.io"),
            warm_packages=(*_SKLEARN_WARM, "skops"),
        ),
        FormatFacts(
            "torch-state-dict",
            ("torch",),
            "torch",
            _TORCH_STATE,
            "safe",  # torch.load(weights_only=True); the class must be installed code
            checked_packages=("torch",),
            preload=("numpy", "torch"),
            warm_packages=("numpy", "torch"),
        ),
        FormatFacts(
            "safetensors",
            ("torch",),
            "torch",
            (".safetensors",),
            "safe",
            preload=("numpy", "torch", "safetensors.torch"),
            warm_packages=("numpy", "torch", "safetensors"),
        ),
        FormatFacts(
            "torchscript",
            ("torch",),
            "torch",
            _TORCH_STATE,
            "unrestricted",  # a program, loaded by torch.jit.load
            checked_packages=("torch",),
            preload=("numpy", "torch"),
            warm_packages=("numpy", "torch"),
        ),
        FormatFacts(
            "torch-export",
            ("torch",),
            "torch",
            (".pt2",),
            "unrestricted",  # a program; its loader is not hardened against hostile input
            checked_packages=("torch",),
            preload=("numpy", "torch"),
            warm_packages=("numpy", "torch"),
        ),
        FormatFacts(
            "keras",
            ("keras",),
            "tensorflow",
            (".keras",),
            "safe",  # .keras archive, safe_mode=True
            checked_packages=("keras",),
            preload=("numpy", "h5py"),  # NOTE: h5py's import runs `uname -p`, refused once confined
            worker_preload=("keras",),
        ),
        FormatFacts(
            "keras-h5",
            ("keras",),
            "tensorflow",
            (".h5", ".hdf5"),
            "unrestricted",  # no safe mode: Lambda layers run
            checked_packages=("keras",),
            worker_preload=("keras",),
        ),
        FormatFacts(
            "savedmodel",
            ("tensorflow-cpu", "tensorflow"),
            "tensorflow",
            (),
            "unrestricted",  # a TensorFlow graph can call file and process ops
            worker_preload=("tensorflow",),
        ),
        FormatFacts(
            "onnx",
            ("onnxruntime",),
            "onnx",
            (".onnx",),
            "safe",  # external data confined to the version directory
            checked_packages=("onnx",),
            preload=("numpy", "onnx", "onnxruntime"),
            warm_packages=("numpy", "onnx"),
        ),
    )
}

MIN_VERSIONS: dict[str, tuple[str, str]] = {
    "torch": ("2.10", "weights_only bypasses fixed (CVE-2025-32434 and later)"),
    "keras": ("3.14", "safe_mode bypasses through config.json fixed"),
    "onnx": ("1.21", "external-data path traversal fixes"),
    "skops": ("0.13", "trusted-type check fixes"),
}
"""Package -> (minimum version, why). Checked only for a format's ``checked_packages``."""
