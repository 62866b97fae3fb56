"""Compression at rest: zstd (gzip where zstandard is missing), streaming both ways.

Decompression never trusts the stream: output beyond ``expected_size`` (the
manifest's logical size) raises :class:`serving.errors.IntegrityError` as soon
as it is produced, with memory bounded by one output chunk, so a
decompression bomb costs a few KiB of work, not the disk.

Example:
    >>> compress_file(Path("model.joblib"), Path("model.joblib.zst"), "zstd")  # doctest: +SKIP
    >>> with open("out", "wb") as f:  # doctest: +SKIP
    ...     w = DecompressingWriter(f, "zstd", expected_size=1234)
    ...     w.write(stored_bytes); w.close()
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from serving.errors import IntegrityError, InvalidRequest
from serving.fileio import HashingWriter
from serving.store.base import Sink

__all__ = ["ALGORITHMS", "DecompressingWriter", "compress_file", "default_algorithm"]

ALGORITHMS = ("zstd", "gzip")
_CHUNK = 1024 * 1024
_OUT_CHUNK = 256 * 1024
_ZSTD_MAX_WINDOW = 1 << 27
"""128 MiB: zstd's own default cap on decoder memory, stated so it cannot drift."""


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def default_algorithm() -> str:
    """``zstd`` when zstandard is installed, else ``gzip`` (standard library)."""
    return "zstd" if _zstd() is not None else "gzip"


def _check(algorithm: str) -> str:
    if algorithm not in ALGORITHMS:
        raise InvalidRequest(f"unknown compression {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    if algorithm == "zstd" and _zstd() is None:
        raise InvalidRequest("zstd needs the zstandard package; use gzip or install zstandard")
    return algorithm


def compress_file(src: Path, dst: Path, algorithm: str, level: int | None = None) -> tuple[int, str]:
    """Compress ``src`` into ``dst``; returns the stored size and sha256."""
    _check(algorithm)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        out = HashingWriter(fout)
        if algorithm == "zstd":
            zstd = _zstd()
            cctx = zstd.ZstdCompressor(level=3 if level is None else level, write_content_size=True)
            # NOTE: closefd=False: the caller's file stays open for the hash to finish.
            with cctx.stream_writer(out, closefd=False) as writer:
                while chunk := fin.read(_CHUNK):
                    writer.write(chunk)
        else:
            comp = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
            while chunk := fin.read(_CHUNK):
                out.write(comp.compress(chunk))
            out.write(comp.flush())
    return out.size, out.hexdigest()


class _Limited:
    """Passes output on, refusing to exceed the declared logical size."""

    def __init__(self, sink: Sink, max_output: int, label: str) -> None:
        self._sink, self._max, self._label = sink, max_output, label
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self._max:
            raise IntegrityError(
                f"{self._label}: decompresses to more than the {self._max} bytes the manifest "
                "declares (refusing a decompression bomb)"
            )
        self._sink.write(data)
        return len(data)


class DecompressingWriter:
    """A sink that decompresses what is written into it and writes plaintext on.

    Call :meth:`close` after the last write: it checks the stream was complete
    and produced exactly ``expected_size`` bytes (the manifest's logical size).

    Raises:
        IntegrityError: corrupt input, output beyond ``expected_size`` (a
            decompression bomb), or a truncated stream.
    """

    def __init__(self, sink: Sink, algorithm: str, expected_size: int, label: str = "stream") -> None:
        self._algorithm = _check(algorithm)
        self._label = label
        self._expected = expected_size
        self._out = _Limited(sink, expected_size, label)
        self._gzip: Any = None
        self._zstd: Any = None
        self._errors: tuple[type[BaseException], ...] = (zlib.error,)
        if algorithm == "zstd":
            zstd = _zstd()
            self._errors = (zstd.ZstdError,)
            dctx = zstd.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
            self._zstd = dctx.stream_writer(self._out, write_size=_OUT_CHUNK, closefd=False)
        else:
            self._gzip = zlib.decompressobj(31)

    @property
    def output_size(self) -> int:
        return self._out.size

    def write(self, data: bytes) -> int:
        try:
            if self._zstd is not None:
                self._zstd.write(data)
            else:
                # NOTE: max_length bounds each step's output; the rest waits in unconsumed_tail.
                buf = data
                while buf:
                    self._out.write(self._gzip.decompress(buf, _OUT_CHUNK))
                    buf = self._gzip.unconsumed_tail
                    if self._gzip.eof and (buf or self._gzip.unused_data):
                        raise IntegrityError(f"{self._label}: data after the end of the gzip stream")
        except self._errors as exc:
            raise IntegrityError(f"{self._label}: corrupt {self._algorithm} data") from exc
        return len(data)

    def close(self) -> None:
        """Finish the stream; the output must be exactly ``expected_size`` bytes."""
        if self._zstd is not None:
            try:
                self._zstd.flush()
            except self._errors as exc:
                raise IntegrityError(f"{self._label}: corrupt zstd data") from exc
        elif not self._gzip.eof:
            raise IntegrityError(f"{self._label}: truncated gzip stream")
        # NOTE: zstd's stream_writer does not report an unfinished frame; a truncated
        # one just stops producing output, which this size check catches.
        if self._out.size != self._expected:
            raise IntegrityError(
                f"{self._label}: decompressed to {self._out.size} bytes, the manifest says {self._expected}"
            )
