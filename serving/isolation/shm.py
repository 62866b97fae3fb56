"""Tensors between the serving process and a model worker, through shared memory.

Each side writes what it sends into a memory file it owns (``memfd``) and sends a
small JSON header: per tensor its name, dtype, shape, offset and byte count. The
other side maps the same file, so a 10,000-row request is written once and read
in place: nothing is pickled.

The header from a worker is read as hostile input. :func:`unpack` admits numeric,
fixed-width string and bytes dtypes only (never ``object``, never a structured
dtype), checks every shape, offset and size against the mapping, and copies the
tensors out. Memory files are sealed against shrinking before the other side maps
them, so a worker cannot cut a mapping short under the serving process (a read past
the end of a shrunk file is a ``SIGBUS``).

Variable-length strings (``BYTES`` tensors, ``object`` arrays) travel ragged: the
offsets of each element (``int64``, one more than the elements) then the bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import mmap
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Arena", "ProtocolViolation", "pack", "unpack"]

MAX_RANK = 32
_ALIGN = 64
_MIN_SIZE = 1 << 20
_DTYPE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248]|[US][1-9][0-9]{0,8})$")
_RAGGED = ("bytes", "str")


class ProtocolViolation(Exception):
    """What the other side sent is not a well-formed answer."""


class Arena:
    """One side's memory file: grown (replaced) when a message needs more, sealed against shrinking."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd = -1
        self.size = 0
        self.view: mmap.mmap | None = None

    def ensure(self, needed: int) -> bool:
        """Room for ``needed`` bytes; True when the file was replaced (send the new fd)."""
        if needed <= self.size and self.view is not None:
            return False
        size = max(_MIN_SIZE, 1 << max(0, needed - 1).bit_length())
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # NOTE: the reader cannot shrink it under us (SIGBUS) nor grow it (memory outside limits).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            view = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self.fd, self.size, self.view = fd, size, view
        return True

    def close(self) -> None:
        if self.view is not None:
            # NOTE: a tensor may still view it; then the mapping goes with its last view.
            with contextlib.suppress(BufferError):
                self.view.close()
            self.view = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.size = 0


def map_peer(fd: int, *, max_size: int | None = None, readonly: bool = False) -> mmap.mmap:
    """Map the other side's memory file; it must be sealed against shrinking and, with
    ``max_size``, no larger (a worker must not choose how much of our address space it takes)."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ProtocolViolation(f"not a sealed memory file: {exc}") from exc
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolViolation("the memory file can shrink (F_SEAL_SHRINK is missing)")
    size = os.fstat(fd).st_size
    if size <= 0:
        raise ProtocolViolation("the memory file is empty")
    if max_size is not None and size > max_size:
        raise ProtocolViolation(f"the memory file is {size} bytes, over the limit of {max_size}")
    try:
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
    except (OSError, ValueError) as exc:
        raise ProtocolViolation(f"the memory file cannot be mapped: {exc}") from exc


def _ragged(array: np.ndarray) -> tuple[str, bytes, np.ndarray]:
    items = array.reshape(-1).tolist()
    kind = "str" if items and all(isinstance(x, str) for x in items) else "bytes"
    blobs = [x.encode() if isinstance(x, str) else bytes(x) for x in items]
    offsets = np.zeros(len(blobs) + 1, dtype="<i8")
    if blobs:
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return kind, b"".join(blobs), offsets


def pack(
    arrays: Mapping[str, np.ndarray], arena: Arena, limit: int | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Write ``arrays`` into ``arena``; their headers, and whether the arena's file is new.

    Raises:
        OverflowError: they hold more than ``limit`` bytes.
        TypeError: a dtype that cannot cross (an ``object`` array of neither str nor bytes).
    """
    plans: list[tuple[str, np.ndarray, str | None, bytes, np.ndarray | None]] = []
    total = 0
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.kind == "O":
            kind, blob, offsets = _ragged(array)
            plans.append((name, array, kind, blob, offsets))
            total += _aligned(offsets.nbytes + len(blob))
        else:
            if array.dtype.kind not in "biufUS":
                raise TypeError(f"output {name!r}: dtype {array.dtype} cannot be served")
            plans.append((name, array, None, b"", None))
            total += _aligned(array.nbytes)
        if limit is not None and total > limit:
            raise OverflowError(f"the tensors hold more than {limit} bytes")
    replaced = arena.ensure(total)
    assert arena.view is not None
    headers: list[dict[str, Any]] = []
    offset = 0
    for name, array, ragged, blob, table in plans:
        head: dict[str, Any] = {"name": name, "shape": list(array.shape), "offset": offset}
        if table is not None:
            head["ragged"] = ragged
            head["dtype"] = "<i8"
            arena.view[offset : offset + table.nbytes] = table.tobytes()
            start = offset + table.nbytes
            arena.view[start : start + len(blob)] = blob
            head["nbytes"] = table.nbytes + len(blob)
        else:
            flat = np.ascontiguousarray(array)
            if flat.dtype.byteorder == ">":
                flat = flat.astype(flat.dtype.newbyteorder("<"))
            head["dtype"] = flat.dtype.str
            head["nbytes"] = flat.nbytes
            if flat.nbytes:
                target = np.ndarray(flat.shape, flat.dtype, buffer=arena.view, offset=offset)
                np.copyto(target, flat)
        offset += _aligned(head["nbytes"])
        headers.append(head)
    return headers, replaced


def unpack(
    headers: Any, buffer: mmap.mmap | None, *, copy: bool, limit: int | None = None
) -> dict[str, np.ndarray]:
    """Read tensors back from ``buffer`` by their ``headers``, checking every field.

    ``copy``: copy each tensor out (the sender reuses its file); else views into it.

    Raises:
        ProtocolViolation: a header that does not describe a tensor inside the buffer.
    """
    if not isinstance(headers, list):
        raise ProtocolViolation("tensors must be a list")
    size = len(buffer) if buffer is not None else 0
    out: dict[str, np.ndarray] = {}
    total = 0
    for head in headers:
        if not isinstance(head, dict):
            raise ProtocolViolation("a tensor header must be an object")
        name, dtype_s, shape, offset, nbytes = (
            head.get("name"),
            head.get("dtype"),
            head.get("shape"),
            head.get("offset"),
            head.get("nbytes"),
        )
        if not isinstance(name, str) or name in out or len(name) > 256:
            raise ProtocolViolation(f"bad or repeated tensor name {name!r:.80}")
        if not isinstance(dtype_s, str) or not _DTYPE.fullmatch(dtype_s):
            raise ProtocolViolation(f"{name!r}: dtype {dtype_s!r:.40} cannot cross")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise ProtocolViolation(f"{name!r}: bad shape")
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
            raise ProtocolViolation(f"{name!r}: bad offset or size")
        if offset + nbytes > size:
            raise ProtocolViolation(
                f"{name!r}: {nbytes} bytes at {offset} are past the end of the memory file"
            )
        total += nbytes
        if limit is not None and total > limit:
            raise ProtocolViolation(f"the tensors hold more than {limit} bytes")
        count = math.prod(shape)
        ragged = head.get("ragged")
        if ragged is not None:
            out[name] = _read_ragged(name, ragged, buffer, offset, nbytes, count, shape)
            continue
        dtype = np.dtype(dtype_s)
        if count * dtype.itemsize != nbytes:
            raise ProtocolViolation(f"{name!r}: shape {shape} of {dtype} is not {nbytes} bytes")
        if nbytes == 0:
            out[name] = np.zeros(shape, dtype)
            continue
        assert buffer is not None
        array = np.ndarray(shape, dtype, buffer=buffer, offset=offset)
        out[name] = array.copy() if copy else array
    return out


def _read_ragged(
    name: str, kind: Any, buffer: mmap.mmap | None, offset: int, nbytes: int, count: int, shape: list[int]
) -> np.ndarray:
    if kind not in _RAGGED:
        raise ProtocolViolation(f"{name!r}: unknown ragged kind {kind!r:.40}")
    table = 8 * (count + 1)
    if table > nbytes or buffer is None:
        raise ProtocolViolation(f"{name!r}: the offsets of {count} elements do not fit in {nbytes} bytes")
    offsets = np.frombuffer(buffer, dtype="<i8", count=count + 1, offset=offset).astype(np.int64)
    data = bytes(buffer[offset + table : offset + nbytes])
    if offsets[0] != 0 or offsets[-1] != len(data) or (count and bool(np.any(np.diff(offsets) < 0))):
        raise ProtocolViolation(f"{name!r}: element offsets out of order or out of range")
    items: list[Any] = [data[offsets[i] : offsets[i + 1]] for i in range(count)]
    if kind == "str":
        try:
            items = [b.decode() for b in items]
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"{name!r}: a string element is not UTF-8") from exc
    result = np.empty(count, dtype=object)
    result[:] = items
    return result.reshape(shape)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
