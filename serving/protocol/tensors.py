"""Tensors on the wire: shapes, raw little-endian bytes, and conforming to a model's specs.

Shared by every codec: the REST binary extension and gRPC's raw contents carry
the same bytes (little-endian, row-major; BYTES elements each a 4-byte
little-endian length and the bytes), and every decoded request is conformed to
the serving version's :class:`~serving.manifest.TensorSpec` list the same way.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from serving.errors import InvalidInput, PayloadTooLarge
from serving.formats.base import NUMPY_TO_OIP, OIP_TO_NUMPY, oip_datatype
from serving.manifest import TensorSpec
from serving.protocol.types import MAX_RANK

MAX_ELEMENTS = 2**48
"""Most elements one tensor may declare (numpy's index type stops at 2**63; no body gets near this)."""


def check_shape(name: str, shape: Any) -> list[int]:
    """A declared shape as a list of non-negative ints, with a bounded rank and element count.

    Raises:
        InvalidInput: not a list of non-negative integers, rank over :data:`MAX_RANK`,
            or more elements than :data:`MAX_ELEMENTS` (zero-size dimensions aside).
    """
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: rank {len(shape)} is over the limit of {MAX_RANK}")
    # NOTE: the product of the non-zero dimensions, so [0, 2**70] is refused too (numpy would overflow).
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} declares over {MAX_ELEMENTS} elements")
    return list(shape)


def numpy_dtype(name: str, datatype: Any) -> np.dtype[Any]:
    if datatype not in OIP_TO_NUMPY:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r}")
    return np.dtype(OIP_TO_NUMPY[datatype])


_BY_DTYPE: dict[np.dtype[Any], str] = {np.dtype(k): v for k, v in NUMPY_TO_OIP.items()}
"""NUMPY_TO_OIP keyed by the dtype itself: ``str(dtype)`` runs numpy's Python code (a few
microseconds, three times a request)."""


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an output array (strings and objects are BYTES)."""
    found = _BY_DTYPE.get(array.dtype)
    return found if found is not None else NUMPY_TO_OIP.get(str(array.dtype), "BYTES")


def from_binary(name: str, chunk: memoryview | bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """One tensor's raw bytes as an array of ``shape``.

    Raises:
        InvalidInput: the byte count does not fit the shape and datatype.
    """
    dtype = numpy_dtype(name, datatype)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(name, memoryview(chunk), count).reshape(shape)
    want = count * dtype.itemsize
    if len(chunk) != want:
        raise InvalidInput(
            f"input {name!r}: its binary data (binary_data_size, raw_input_contents) is "
            f"{len(chunk)} bytes, but {count} {datatype} values take {want}"
        )
    # NOTE: copy out of the request body: a writable array that owns its memory
    # (torch warns on read-only numpy arrays) and does not pin the whole body.
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True).reshape(shape)


def _bytes_from_binary(name: str, chunk: memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > end:
            raise InvalidInput(f"input {name!r}: a BYTES element of {length} bytes runs past its data")
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise InvalidInput(f"input {name!r}: {len(items)} BYTES elements do not fill its shape ({count})")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    """An array as raw bytes: little-endian, row-major, BYTES elements length-prefixed."""
    data = array.reshape(-1)
    if datatype != "BYTES":
        return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    parts = []
    for item in data.tolist():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def conform(inputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """A request's inputs against a version's specs: names, rank, fixed dimensions and datatypes.

    A single-input model takes its one input under any name. Numeric inputs are
    cast to the model's datatype; anything else must match it.

    Raises:
        InvalidInput: an unknown or missing input, or a shape or datatype the model does not take.
    """
    by_name = {s.name: s for s in specs}
    out: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        spec = by_name.get(name)
        if spec is None and len(specs) == 1 and len(inputs) == 1:
            spec = specs[0]  # NOTE: single-input models accept any input name
        if spec is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise InvalidInput(f"unknown input {name!r}; the model's inputs are: {known}")
        out[spec.name] = _conform(array, spec)
    missing = set(by_name) - set(out)
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(sorted(missing))}")
    return out


def _conform(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Check rank and fixed dimensions; cast between numeric types, refuse the rest."""
    if len(array.shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, array.shape, strict=False)
    ):
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(array.shape)} does not match the model's {spec.shape}"
        )
    want = np.dtype(OIP_TO_NUMPY[spec.datatype])
    if array.dtype == want:
        return array
    numeric = "biuf"
    if array.dtype.kind in numeric and want.kind in numeric:
        if want.kind in "iu" and array.dtype.kind in "iuf" and array.size:
            # NOTE: no silent wrap-around: 2**63 arrives as UINT64 (or, beside smaller ints in
            # v1's untyped JSON, as FP64) and would become a negative INT64.
            info = np.iinfo(want)
            low, high = array.min(), array.max()
            # NOTE: ">= max + 1", not "> max": 2**63 - 1 is not a float, and 2**63 as a float
            # equals it after rounding; the bounds ``min`` and ``max + 1`` are exact as floats.
            if not (np.isfinite(low) and np.isfinite(high)) or low < info.min or high >= info.max + 1:
                raise InvalidInput(f"input {spec.name!r}: a value is out of range for {spec.datatype}")
        return array.astype(want)
    if want.kind == "O" and array.dtype.kind in "US":
        return array.astype(object)
    raise InvalidInput(
        f"input {spec.name!r}: datatype {oip_datatype(array.dtype)} "
        f"does not match the model's {spec.datatype}"
    )


def select_outputs(outputs: dict[str, np.ndarray], names: list[str] | None) -> dict[str, np.ndarray]:
    """The outputs asked for, in the order asked (all of them for None).

    Raises:
        InvalidInput: an output the model does not produce.
    """
    if names is None:
        return outputs
    for name in names:
        if name not in outputs:
            raise InvalidInput(f"unknown output {name!r}; the model produces: {', '.join(outputs)}")
    return {name: outputs[name] for name in names}


def check_reply_size(outputs: dict[str, np.ndarray], limit: int) -> None:
    """Refuse an answer whose tensors hold more than ``limit`` bytes, before it is encoded.

    BYTES elements count their length; every other tensor its buffer.

    Raises:
        PayloadTooLarge: a 413 that names the size and the limit.
    """
    total = 0
    for array in outputs.values():
        if array.dtype.kind == "O":
            total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in array.reshape(-1).tolist())
        else:
            total += array.nbytes
        if total > limit:
            break
    if total > limit:
        raise PayloadTooLarge(
            f"the answer's tensors hold over {limit} bytes (max_reply_bytes); ask for fewer rows or outputs"
        )
