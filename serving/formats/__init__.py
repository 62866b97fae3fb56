"""Artifact formats behind one Predictor interface; frameworks are imported lazily.

Format names (the manifest's ``format`` field)::

    sklearn           joblib file, restricted unpickler
    pickle            plain pickle file, restricted unpickler
    skops             skops.io, skops's trusted types + LoadPolicy.trusted_globals
    torch-state-dict  torch.load(weights_only=True) + options class_path/init_kwargs
    safetensors       safetensors.torch.load_file + options class_path/init_kwargs
    torchscript       torch.jit.load
    torch-export      torch.export.load (.pt2)
    keras             .keras archive, safe mode
    keras-h5          legacy .h5, only with LoadPolicy.allow_legacy_h5
    savedmodel        TensorFlow SavedModel directory, serving_default signature
    onnx              onnxruntime, CPU provider

Example:
    >>> from serving.formats import detect_format, load_predictor  # doctest: +SKIP
    >>> detect_format(Path("model.joblib"))  # doctest: +SKIP
    'sklearn'
"""

from __future__ import annotations

from pathlib import Path

from serving.errors import LoadError, ServingError, UnknownFormat, UntrustedArtifact
from serving.manifest import Manifest

from .base import Format, LoadPolicy, Predictor
from .keras_tf import KerasFormat, KerasH5Format, SavedModelFormat
from .onnx_runtime import OnnxFormat
from .pickled import PickleFormat, SklearnFormat
from .pytorch import TorchExportFormat, TorchScriptFormat, TorchStateDictFormat
from .safetensors_torch import SafetensorsFormat
from .skops_io import SkopsFormat

__all__ = [
    "FORMATS",
    "Format",
    "LoadPolicy",
    "Predictor",
    "detect_format",
    "get_format",
    "load_predictor",
]

# NOTE: detection tries formats in this order: the most specific content checks
# (directory layouts, zip members) before the loosest (any pickle stream).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        SavedModelFormat(),
        OnnxFormat(),
        KerasFormat(),
        SkopsFormat(),
        TorchExportFormat(),
        TorchScriptFormat(),
        TorchStateDictFormat(),
        # NOTE: before the pickle formats: a header length can start with pickle's magic bytes.
        SafetensorsFormat(),
        KerasH5Format(),
        SklearnFormat(),
        PickleFormat(),
    )
}


def get_format(name: str) -> Format:
    """The format called ``name``.

    Raises:
        UnknownFormat: no format has that name.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise UnknownFormat(
            f"unknown format {name!r}: known formats are {', '.join(sorted(FORMATS))}"
        ) from None


def detect_format(path: Path) -> str:
    """The name of the format of ``path`` (a file or directory about to be published).

    Raises:
        UnknownFormat: no format recognises it.
    """
    path = Path(path)
    for fmt in FORMATS.values():
        try:
            if fmt.detect(path):
                return fmt.name
        except OSError as exc:
            raise UnknownFormat(f"cannot read {path} to detect its format: {exc}") from exc
    kind = "directory" if path.is_dir() else "file"
    raise UnknownFormat(
        f"cannot tell the format of {kind} {path}: it matches none of {', '.join(sorted(FORMATS))}; "
        f"name the format explicitly if it is one of them"
    )


def load_predictor(root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
    """Load a verified version directory into a Predictor.

    Args:
        root: the version directory; its files are at ``manifest.files`` paths.
        manifest: the version's manifest (its ``format`` picks the loader).
        policy: what the loaders may trust.

    Raises:
        UnknownFormat: the manifest names no known format.
        UntrustedArtifact: the policy refused the artifact.
        MissingExtra: the format's framework is not installed.
        LoadError: the framework failed to load it (the cause is chained).
    """
    fmt = get_format(manifest.format)
    if fmt.runs_code and not policy.allow_unrestricted:
        # NOTE: defence in depth behind serving.trust.check_trust, for any caller that
        # reaches a loader without it.
        raise UntrustedArtifact(
            f"{manifest.name}:{manifest.version}: format {fmt.name!r} runs code when loaded; "
            "it loads only for a signed version of a model listed in SERVING_UNRESTRICTED_MODELS"
        )
    try:
        return fmt.load(Path(root), manifest, policy)
    except ServingError:
        raise
    except (Exception, SystemExit) as exc:  # NOTE: a load that calls sys.exit() must not end the server
        raise LoadError(
            f"{manifest.name}:{manifest.version}: {fmt.framework} failed to load the "
            f"{fmt.name} model: {type(exc).__name__}: {exc}"
        ) from exc
