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
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.cache import LoaderCache
from serving.errors import InvalidInput, InvalidRequest
from serving.formats.base import LoadPolicy
from serving.isolation.worker import WorkerLimits, WorkerPredictor
from serving.manifest import Manifest, ModelRef
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings
from serving.store.local import LocalStore
from serving.trust import check_trust

log = logging.getLogger(__name__)

__all__ = ["ConversionRefused", "Derived", "convert", "quantize", "read_validation_data"]

MAX_VALIDATION_ROWS = 100_000


class ConversionRefused(InvalidRequest):
    """The converted model does not answer as the source does."""


@dataclass(frozen=True)
class Derived:
    """What a conversion measured, as recorded in the derived version's manifest
    (``metadata.derived_from``)."""

    version: str
    manifest_sha256: str
    converter: str
    converter_version: str
    measured: dict[str, Any]
    """A conversion: ``tolerance``, ``max_error``, ``rows_checked``, ``left_out``. A quantization:
    ``quantization``, ``max_accuracy_drop``, ``accuracy_drop``, ``max_score_change``,
    ``size_ratio``, ``latency_ratio``, ``rows_checked``."""

    def as_metadata(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "converter": self.converter,
            "converter_version": self.converter_version,
            **self.measured,
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
    if not np.isfinite(data).all():
        raise InvalidRequest(f"{path}: validation data holds NaN or infinite values")
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
    if not 0 <= tolerance < math.inf:
        raise InvalidRequest("the tolerance must be a finite number >= 0")

    def judge(
        source: WorkerPredictor, candidate: WorkerPredictor, batches: list[np.ndarray], done: Any, _: Any
    ) -> Any:
        names = list(done["outputs"])
        max_error = _compare(source, candidate, batches, tolerance, names)
        probes = _probes_the_source_takes(source, probe_rows(batches[0]))
        max_error = max(max_error, _compare(source, candidate, probes, tolerance, names))
        return {
            "tolerance": tolerance,
            "max_error": max_error,
            "rows_checked": sum(len(b) for b in batches),
            "validation_rows": sum(len(b) for b in batches[1:]),
            "probe_rows": sum(len(b) for b in probes),
            "left_out": [str(n) for n in done.get("left_out", [])],
        }

    return _derive(repo, cache, settings, ref, "onnx", validation, limits, judge, publish)


def quantize(
    repo: Repository,
    cache: LoaderCache,
    settings: Settings,
    ref: str,
    how: str,
    *,
    validation: np.ndarray | None = None,
    max_accuracy_drop: float = 0.01,
    limits: WorkerLimits | None = None,
    **publish: Any,
) -> tuple[Manifest, Derived]:
    """Quantize ONNX version ``ref`` (``how``: ``int8`` or ``fp16``) and publish the result.

    Measured on the example and ``validation`` rows, and recorded: the accuracy drop (the
    share of rows whose label changed: an output that is not floating point, or the argmax
    of a float output with several columns; a model with neither is judged by its largest
    score change relative to the largest score), the largest score change, the size ratio
    and the latency ratio (the largest batch through both workers; below 1 is faster).

    Raises:
        InvalidRequest: not an ONNX version, an unknown quantization, or the quantizer refuses.
        ConversionRefused: the accuracy drop is over ``max_accuracy_drop``.
    """
    from serving.formats.onnx_convert import QUANTIZATIONS

    if how not in QUANTIZATIONS:
        raise InvalidRequest(f"unknown quantization {how!r}: {', '.join(QUANTIZATIONS)}")
    if not 0 <= max_accuracy_drop <= 1:
        raise InvalidRequest("the largest accuracy drop must be between 0 and 1")

    def judge(
        source: WorkerPredictor,
        candidate: WorkerPredictor,
        batches: list[np.ndarray],
        _: Any,
        sizes: tuple[int, int],
    ) -> Any:
        size_ratio = sizes[1] / sizes[0]
        if not size_ratio < 1:
            raise ConversionRefused(
                f"quantizing to {how} made the model no smaller (x{size_ratio:.2f}): it holds no "
                "weights the quantizer reduces (int8 quantizes MatMul and Gemm weights)"
            )
        return {
            "quantization": how,
            "max_accuracy_drop": max_accuracy_drop,
            **_judge_quantized(source, candidate, batches, max_accuracy_drop),
            "size_ratio": size_ratio,
        }

    return _derive(repo, cache, settings, ref, how, validation, limits, judge, publish)


Judge = Callable[[WorkerPredictor, WorkerPredictor, list[np.ndarray], Any, tuple[int, int]], dict[str, Any]]
"""Compares the source and the derived model (raising ConversionRefused) and says what to record;
its arguments: both workers, the batches, the worker's answer to the conversion, both sizes."""


def _derive(
    repo: Repository,
    cache: LoaderCache,
    settings: Settings,
    ref: str,
    to: str,
    validation: np.ndarray | None,
    limits: WorkerLimits | None,
    judge: Judge,
    publish: dict[str, Any],
) -> tuple[Manifest, Derived]:
    """The one path of a conversion and a quantization: the source loaded in a worker, which
    writes the derived ONNX model; that loaded in a worker of its own; ``judge`` compares them
    (raising ConversionRefused) and says what to record; then the new version is published."""
    resolved = repo.resolve(ModelRef.parse(ref))
    manifest = resolved.manifest
    where = f"{manifest.name}:{manifest.version}"
    if to == "onnx" and manifest.format == "onnx":
        raise InvalidRequest(f"{where} is already ONNX")
    if to != "onnx" and manifest.format != "onnx":
        raise InvalidRequest(f"{where} is {manifest.format}: only ONNX versions quantize (convert it first)")
    if manifest.example is None:
        raise InvalidRequest(f"{where} has no example input to convert and check with")
    example = _rows(manifest.example, "the manifest's example")
    if validation is not None and validation.shape[1:] != example.shape[1:]:
        raise InvalidRequest(
            f"the validation rows have shape {list(validation.shape[1:])} each, the example "
            f"{list(example.shape[1:])}"
        )
    cached = cache.fetch(repo, resolved)
    policy = check_trust(repo, resolved, settings, cache_root=cache.root).policy
    limits = limits or WorkerLimits()
    with tempfile.TemporaryDirectory(prefix="serving-convert-") as scratch:
        out = Path(scratch) / "out"
        out.mkdir()
        source = WorkerPredictor(cached, policy, limits, model=manifest.name, warmup=False)
        try:
            try:
                source.predict({source.inputs[0].name if source.inputs else "input-0": example})
            except InvalidInput as exc:
                raise InvalidRequest(f"the manifest's example does not fit {where}: {exc.message}") from exc
            done = source.convert(str(out), example.tolist(), to=to, source=_onnx_file(cached.path, manifest))
            candidate_manifest, candidate = _load_candidate(
                out / "model.onnx", manifest, example, scratch, limits
            )
            try:
                batches = [example] if validation is None else [example, validation]
                sizes = (manifest.total_bytes, candidate_manifest.total_bytes)
                measured = judge(source, candidate, batches, done, sizes)
            finally:
                candidate.close()
        finally:
            source.close()
        derived = Derived(
            version=manifest.version,
            manifest_sha256=cached.manifest_sha256,
            converter=str(done["converter"]),
            converter_version=str(done["converter_version"]),
            measured=measured,
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


def _rows(value: Any, what: str) -> np.ndarray:
    try:
        rows = np.asarray(value)
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not a table of numbers: {exc}") from exc
    if rows.dtype.kind not in "iuf" or rows.ndim < 2 or not len(rows):
        raise InvalidRequest(f"{what} must be rows of numbers (a 2-D or higher table)")
    return rows


def _onnx_file(root: Path, manifest: Manifest) -> str | None:
    """The version's one ``.onnx`` file, for a quantizer (None for other formats)."""
    if manifest.format != "onnx":
        return None
    files = [f.path for f in manifest.files if f.path.endswith(".onnx")]
    if len(files) != 1 or len(manifest.files) != 1:
        raise InvalidRequest("only a version of one .onnx file (no external data) quantizes")
    return str(root / files[0])


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
) -> float:
    """The largest score difference over every row of ``batches``.

    Raises:
        ConversionRefused: a label differs, a score differs by more than ``tolerance``, or an
            output changed its shape.
    """
    if not names:
        raise ConversionRefused("the converted model computes none of the source's outputs")
    worst = 0.0
    source_input = source.inputs[0].name if source.inputs else "input-0"
    candidate_input = candidate.inputs[0].name
    for batch in batches:
        want = source.predict_only({source_input: batch}, names)
        got = candidate.predict_only({candidate_input: batch}, names)
        for name in names:
            if name not in want or name not in got:
                raise ConversionRefused(f"output {name!r} is missing from one side's answer")
            worst = max(worst, _difference(name, np.asarray(want[name]), np.asarray(got[name]), tolerance))
    return worst


def _difference(name: str, a: np.ndarray, b: np.ndarray, tolerance: float) -> float:
    """The largest score difference of one output; labels (either side not floating point) must
    be equal, numbers compared as numbers, strings as strings; NaN where both have NaN is equal."""
    if a.shape != b.shape:
        raise ConversionRefused(
            f"output {name!r}: shape {list(b.shape)} after conversion, {list(a.shape)} before"
        )
    if not a.size:
        return 0.0
    numeric = a.dtype.kind in "biuf" and b.dtype.kind in "biuf"
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        both_nan = np.isnan(a64) & np.isnan(b64)
        gap = np.where(both_nan, 0.0, np.abs(a64 - b64))
        error = float(np.max(gap))
        if not error <= tolerance:
            raise ConversionRefused(
                f"output {name!r} differs by up to {error:.3g}, over the tolerance of {tolerance:g}"
            )
        return error
    if numeric:
        differ = np.flatnonzero(a.astype(np.float64).ravel() != b.astype(np.float64).ravel())
    else:
        differ = np.flatnonzero(a.astype(str).ravel() != b.astype(str).ravel())
    if differ.size:
        row = int(differ[0]) // max(1, int(np.prod(a.shape[1:]))) if a.ndim else 0
        raise ConversionRefused(
            f"labels differ on {differ.size} of {a.size} values of output {name!r} "
            f"(first at row {row}): labels must agree on every row"
        )
    return 0.0


def _probes_the_source_takes(source: WorkerPredictor, batches: list[np.ndarray]) -> list[np.ndarray]:
    """The probe batches the source answers (a model may refuse negative or zero rows)."""
    name = source.inputs[0].name if source.inputs else "input-0"
    taken = []
    for batch in batches:
        try:
            source.predict({name: batch})
        except InvalidInput:
            continue
        taken.append(batch)
    return taken


def probe_rows(example: np.ndarray) -> list[np.ndarray]:
    """Batches made from the example, checked besides it: a model traced on one input can have
    kept that input's branch or batch size (the negated, scaled and shifted example, and
    batches of 1, 2 and 3 rows)."""
    rows = example.astype(np.float64)
    first = rows[:1]
    return [
        first,
        np.concatenate([first, first]),
        np.concatenate([rows, rows, rows])[:3],
        -rows,
        rows * 1.1,
        rows * 0.9,
        rows * 10,
        rows + 1,
        np.zeros_like(rows),
    ]


def _judge_quantized(
    source: WorkerPredictor, candidate: WorkerPredictor, batches: list[np.ndarray], max_drop: float
) -> dict[str, Any]:
    """The accuracy drop, largest score change, size and latency ratios of a quantized model.

    Raises:
        ConversionRefused: the accuracy drop is over ``max_drop``.
    """
    names = [o.name for o in source.outputs]
    source_input, candidate_input = source.inputs[0].name, candidate.inputs[0].name
    rows = changed = 0
    max_change = largest = 0.0
    has_labels = False
    for batch in batches:
        want = source.predict({source_input: batch})
        got = candidate.predict({candidate_input: batch})
        flipped = np.zeros(len(batch), dtype=bool)
        for name in names:
            a, b = np.asarray(want[name]), np.asarray(got.get(name))
            if b is None or a.shape != b.shape:
                raise ConversionRefused(f"output {name!r}: the quantized model answers another shape")
            if a.dtype.kind not in "fc":
                has_labels = True
                flipped |= (a.reshape(len(a), -1).astype(str) != b.reshape(len(b), -1).astype(str)).any(
                    axis=1
                )
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if a.size:
                max_change = max(max_change, float(np.max(np.abs(a64 - b64))))
                largest = max(largest, float(np.max(np.abs(a64))))
            if a.ndim == 2 and a.shape[1] > 1:
                has_labels = True
                flipped |= a64.argmax(axis=1) != b64.argmax(axis=1)
        rows += len(batch)
        changed += int(flipped.sum())
    drop = changed / rows if has_labels else (max_change / largest if largest else 0.0)
    if not drop <= max_drop:
        what = f"labels changed on {changed} of {rows} rows" if has_labels else "scores changed"
        raise ConversionRefused(
            f"{what}: an accuracy drop of {drop:.3g}, over the largest allowed ({max_drop:g})"
        )
    bulk = max(batches, key=len)
    return {
        "accuracy_drop": drop,
        "max_score_change": max_change,
        "latency_ratio": _latency(candidate, bulk) / _latency(source, bulk),
        "rows_checked": rows,
    }


def _latency(worker: WorkerPredictor, batch: np.ndarray, calls: int = 5) -> float:
    """Median seconds per predict of ``batch`` through ``worker``."""
    name = worker.inputs[0].name
    worker.predict({name: batch})
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        worker.predict({name: batch})
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]
