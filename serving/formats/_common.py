"""Helpers shared by the format modules: lazy imports, file picking, tensor specs."""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serving.errors import InvalidInput, LoadError, MissingExtra
from serving.manifest import Manifest, TensorSpec, check_relative_path

from .base import numpy_dtype, oip_datatype


def require(module: str, extra: str, format_name: str) -> ModuleType:
    """Import a framework module, or explain which pip extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"format {format_name!r} needs {module!r}, which is not installed: install serving[{extra}]"
        ) from exc


def primary_file(root: Path, manifest: Manifest, suffixes: Iterable[str]) -> Path:
    """The artifact file to hand the framework.

    ``options["file"]`` names it explicitly; otherwise the only file, or the only
    file with one of ``suffixes``.
    """
    explicit = manifest.options.get("file")
    if explicit is not None:
        return root / check_relative_path(str(explicit))
    paths = [f.path for f in manifest.files]
    if len(paths) == 1:
        return root / paths[0]
    wanted = tuple(s.lower() for s in suffixes)
    matches = [p for p in paths if p.lower().endswith(wanted)]
    if len(matches) != 1:
        raise LoadError(
            f"{manifest.name}:{manifest.version}: cannot tell which of {len(paths)} files is the "
            f"{manifest.format} model; name it with the 'file' option"
        )
    return root / matches[0]


def check_zip_expansion(path: Path, limit: int) -> None:
    """Refuse a zip whose members declare more than ``limit`` bytes in all, before any is read.

    ``zipfile`` never returns more than a member's declared size, so the
    declared sizes bound what a reader of the archive can be made to inflate.

    Raises:
        UntrustedArtifact: the members declare more than ``limit`` bytes.
        LoadError: the file is not a readable zip.
    """
    from serving.errors import UntrustedArtifact

    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise LoadError(f"{path.name} is not a readable zip archive: {exc}") from exc
    if declared > limit:
        raise UntrustedArtifact(
            f"{path.name}: its members expand to {declared} bytes, over the limit of {limit} "
            "(refusing a decompression bomb; see SERVING_MAX_EXPANSION_RATIO)"
        )


def default_inputs(manifest: Manifest, datatype: str) -> list[TensorSpec]:
    """The manifest's inputs, or one ``input-0`` of ``datatype`` and shape ``[-1, -1]``."""
    if manifest.inputs:
        return list(manifest.inputs)
    return [TensorSpec(name="input-0", datatype=datatype, shape=[-1, -1])]


def spec_for(name: str, array: np.ndarray) -> TensorSpec:
    """A spec for ``array`` with its first (batch) dimension left open."""
    return TensorSpec(name=name, datatype=oip_datatype(array.dtype), shape=[-1, *array.shape[1:]])


def pick_inputs(
    specs: list[TensorSpec], inputs: Mapping[str, np.ndarray], cast: bool = True
) -> list[np.ndarray]:
    """The arrays for ``specs`` in order, cast to the declared datatypes.

    Raises:
        InvalidInput: a declared input is missing or cannot be cast.
    """
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise InvalidInput(f"missing input(s) {missing}; the model takes {[s.name for s in specs]}")
    out = []
    for spec in specs:
        arr = np.asarray(inputs[spec.name])
        if cast and spec.datatype != "BYTES":
            try:
                arr = arr.astype(numpy_dtype(spec.datatype), copy=False)
            except (TypeError, ValueError) as exc:
                raise InvalidInput(f"input {spec.name!r} is not {spec.datatype}: {exc}") from exc
        out.append(arr)
    return out


def to_numpy_outputs(result: Any, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Framework results (one array, a sequence or a mapping) as named numpy arrays."""
    if isinstance(result, Mapping):
        return {str(k): np.asarray(v) for k, v in result.items()}
    items = list(result) if isinstance(result, list | tuple) else [result]
    out = {}
    for i, item in enumerate(items):
        name = names[i] if names and i < len(names) else f"output-{i}"
        out[name] = np.asarray(item)
    return out


def shape_of(dims: Iterable[Any]) -> list[int]:
    """Framework shapes (None or symbolic for unknown sizes) as OIP shapes (-1)."""
    return [int(d) if isinstance(d, int | np.integer) and d >= 0 else -1 for d in dims]
