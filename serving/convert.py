"""``serving convert NAME:VERSION --to onnx``: publish a version's model converted to ONNX.

The source version is fetched (digest-checked), passes the same trust check as a
version about to be served, and is loaded the safe way, through the allowlist, in a
model worker (:mod:`serving.isolation.worker`): the converter runs there, on the
objects the worker loaded, and writes ``model.onnx`` into a scratch folder. The
result is then loaded in a model worker of its own (an ONNX graph can be hostile
too: a constant-folding bomb), and both predict the manifest's example and the
``--validation-data`` rows. Labels (any output that is not floating point) must agree
on every row; scores within ``tolerance``. Only then is the ONNX model published, as a
new version whose manifest records where it came from::

    metadata.derived_from = {version, manifest_sha256, converter, converter_version,
                             tolerance, max_error, rows_checked, left_out}

The derived version keeps the source's input name and output names, so clients see
no difference; it is an ordinary version (hot swap, canary, shadow, rollout).
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.cache import LoaderCache
from serving.errors import InvalidRequest
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.manifest import Manifest, ModelRef
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.trust import check_trust

log = logging.getLogger(__name__)

__all__ = ["ConversionRefused", "Derived", "convert", "read_validation_data"]

MAX_VALIDATION_ROWS = 100_000


class ConversionRefused(InvalidRequest):
    """The converted model does not answer as the source does."""


@dataclass(frozen=True)
class Derived:
    """What a conversion measured, as recorded in the derived version's manifest."""

    version: str
    manifest_sha256: str
    converter: str
    converter_version: str
    tolerance: float
    max_error: float
    rows_checked: int
    left_out: list[str]

    def as_metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "converter": self.converter,
            "converter_version": self.converter_version,
            "tolerance": self.tolerance,
            "max_error": self.max_error,
            "rows_checked": self.rows_checked,
            "left_out": self.left_out,
        }


def read_validation_data(path: Path) -> np.ndarray:
    """Rows from a ``.npy`` file (numbers only, no pickled objects) or a ``.csv`` of numbers
    (a first row that does not parse is taken as a header).

    Raises:
        InvalidRequest: the file cannot be read, or is not a 2-D table of numbers.
    """
    try:
        if path.suffix == ".npy":
            data = np.asarray(np.load(path, allow_pickle=False))
        elif path.suffix == ".csv":
            with path.open(newline="") as f:
                rows = [row for row in csv.reader(f) if row]
            try:
                data = np.array(rows, dtype=np.float64)
            except ValueError:
                data = np.array(rows[1:], dtype=np.float64)
        else:
            raise InvalidRequest(f"{path}: validation data must be a .npy or .csv file")
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: cannot read validation data: {exc}") from exc
    if data.ndim != 2 or data.dtype.kind not in "iuf" or not len(data):
        raise InvalidRequest(f"{path}: validation data must be a non-empty 2-D table of numbers")
    if len(data) > MAX_VALIDATION_ROWS:
        raise InvalidRequest(f"{path}: more than {MAX_VALIDATION_ROWS} validation rows")
    return data


def convert(
    repo: Repository,
    cache: LoaderCache,
    settings: Settings,
    ref: str,
    *,
    to: str = "onnx",
    validation: np.ndarray | None = None,
    tolerance: float = 1e-4,
    limits: WorkerLimits | None = None,
    **publish: Any,
) -> tuple[Manifest, Derived]:
    """Convert version ``ref`` (``NAME:VERSION`` or ``NAME@ALIAS``) and publish the result.

    ``publish``: :func:`serving.publish.publish_path`'s keywords for the new version
    (``version``, ``alias``, ``signing_key``, ``encode``, ``metadata``, ``progress``).

    Raises:
        InvalidRequest: an unknown target, no example to check on, or no converter.
        ConversionRefused: the converted model disagrees with the source.
        IsolationFailed: the source or the result crashed or ran out of its limits.
    """
    if to != "onnx":
        raise InvalidRequest(f"cannot convert to {to!r}: only onnx")
    if not tolerance >= 0:
        raise InvalidRequest("the tolerance must be a number >= 0")
    parsed = ModelRef.parse(ref)
    resolved = repo.resolve(parsed)
    manifest = resolved.manifest
    if manifest.format == "onnx":
        raise InvalidRequest(f"{manifest.name}:{manifest.version} is already ONNX")
    if manifest.example is None:
        raise InvalidRequest(
            f"{manifest.name}:{manifest.version} has no example input to convert and check with"
        )
    example = np.asarray(manifest.example)
    if example.dtype.kind not in "iuf":
        raise InvalidRequest("only numeric examples convert")
    cached = cache.fetch(repo, resolved)
    policy = check_trust(repo, resolved, settings, cache_root=cache.root).policy
    limits = limits or WorkerLimits()
    with tempfile.TemporaryDirectory(prefix="serving-convert-") as scratch:
        out = Path(scratch) / "out"
        out.mkdir()
        source = WorkerPredictor(cached, policy, limits, model=manifest.name, warmup=False)
        try:
            done = source.convert(str(out), example.tolist())
            candidate_manifest, candidate = _load_candidate(
                out / "model.onnx", manifest, example, scratch, limits
            )
            try:
                checked = [example] if validation is None else [example, validation]
                max_error, rows = _compare(source, candidate, checked, tolerance, list(done["outputs"]))
            finally:
                candidate.close()
        finally:
            source.close()
        derived = Derived(
            version=manifest.version,
            manifest_sha256=cached.manifest_sha256,
            converter=str(done["converter"]),
            converter_version=str(done["converter_version"]),
            tolerance=tolerance,
            max_error=max_error,
            rows_checked=rows,
            left_out=[str(n) for n in done.get("left_out", [])],
        )
        metadata = dict(publish.pop("metadata", None) or {})
        metadata["derived_from"] = derived.as_metadata()
        published = publish_path(
            repo,
            out / "model.onnx",
            manifest.name,
            format="onnx",
            framework="onnx",
            inputs=candidate_manifest.inputs,
            outputs=candidate_manifest.outputs,
            example=manifest.example,
            metadata=metadata,
            **publish,
        )
    return published, derived


def _load_candidate(
    path: Path, source: Manifest, example: np.ndarray, scratch: str, limits: WorkerLimits
) -> tuple[Manifest, WorkerPredictor]:
    """The converted model loaded in a model worker, from a scratch store (nothing is published
    yet), with the source's input and output names."""
    scratch_repo = Repository(LocalStore(str(Path(scratch) / "store")))
    publish_path(
        scratch_repo, path, source.name, version="candidate", format="onnx", example=example.tolist()
    )
    resolved = scratch_repo.resolve(ModelRef.parse(f"{source.name}:candidate"))
    cached = LoaderCache(Path(scratch) / "cache", max_bytes=10 * path.stat().st_size + (64 << 20)).fetch(
        scratch_repo, resolved
    )
    worker = WorkerPredictor(cached, LoadPolicy(), limits, model=source.name, warmup=True)
    manifest = resolved.manifest.model_copy(update={"inputs": worker.inputs, "outputs": worker.outputs})
    return manifest, worker


def _compare(
    source: WorkerPredictor,
    candidate: WorkerPredictor,
    batches: list[np.ndarray],
    tolerance: float,
    names: list[str],
) -> tuple[float, int]:
    """The largest score difference over every row of ``batches``, and the rows checked.

    Raises:
        ConversionRefused: a label differs, a score differs by more than ``tolerance``, or an
            output changed its shape.
    """
    if not names:
        raise ConversionRefused("the converted model computes none of the source's outputs")
    worst = 0.0
    rows = 0
    source_input = source.inputs[0].name if source.inputs else "input-0"
    candidate_input = candidate.inputs[0].name
    for batch in batches:
        want = source.predict_only({source_input: batch}, names)
        got = candidate.predict_only({candidate_input: batch}, names)
        for name in names:
            a, b = np.asarray(want[name]), np.asarray(got.get(name))
            if b is None or a.shape != b.shape:
                raise ConversionRefused(
                    f"output {name!r}: shape {None if b is None else list(b.shape)} after conversion, "
                    f"{list(a.shape)} before"
                )
            if a.dtype.kind not in "fc" or b.dtype.kind not in "fc":
                differ = np.flatnonzero(
                    a.reshape(len(a), -1).astype(str) != b.reshape(len(b), -1).astype(str)
                )
                if differ.size:
                    row = int(differ[0]) // max(1, int(np.prod(a.shape[1:])))
                    raise ConversionRefused(
                        f"labels differ on {differ.size} of {a.size} values of output {name!r} "
                        f"(first at row {row}): labels must agree on every row"
                    )
                continue
            error = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
            if not error <= tolerance:
                raise ConversionRefused(
                    f"output {name!r} differs by up to {error:.3g}, over the tolerance of {tolerance:g}"
                )
            worst = max(worst, error)
        rows += len(batch)
    return worst, rows
