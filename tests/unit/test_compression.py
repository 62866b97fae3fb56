"""Compression at rest: round trips, bombs, corruption and truncation."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import pytest

from serving.compression import DecompressingWriter, compress_file, default_algorithm
from serving.errors import IntegrityError, InvalidRequest

ALGOS = ["zstd", "gzip"]


def payload(tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "plain"
    src.write_bytes(data)
    return src


def decompress(stored: bytes, algorithm: str, expected: int, step: int = 4096) -> bytes:
    out = io.BytesIO()
    w = DecompressingWriter(out, algorithm, expected, label="m:1/f")
    for i in range(0, len(stored), step):
        w.write(stored[i : i + step])
    w.close()
    return out.getvalue()


def test_default_is_zstd_when_installed() -> None:
    """zstandard is a dependency, so zstd is the default."""
    assert default_algorithm() == "zstd"


@pytest.mark.parametrize("algorithm", ALGOS)
def test_round_trip_restores_exact_bytes(tmp_path: Path, algorithm: str) -> None:
    """Compressed then decompressed bytes are identical, and the stored digest is reported."""
    data = os.urandom(100_000) + b"\0" * 3_000_000
    dst = tmp_path / "stored"
    size, sha = compress_file(payload(tmp_path, data), dst, algorithm)
    stored = dst.read_bytes()
    assert size == len(stored) < len(data)
    import hashlib

    assert sha == hashlib.sha256(stored).hexdigest()
    assert decompress(stored, algorithm, len(data)) == data


@pytest.mark.parametrize("algorithm", ALGOS)
def test_empty_file_round_trips(tmp_path: Path, algorithm: str) -> None:
    """A zero-byte file survives compression."""
    dst = tmp_path / "stored"
    compress_file(payload(tmp_path, b""), dst, algorithm)
    assert decompress(dst.read_bytes(), algorithm, 0) == b""


@pytest.mark.parametrize("algorithm", ALGOS)
def test_decompression_bomb_stops_at_declared_size(tmp_path: Path, algorithm: str) -> None:
    """A stream inflating past the manifest's size is refused while producing little output."""
    bomb = tmp_path / "bomb"
    compress_file(payload(tmp_path, b"\0" * (64 * 1024 * 1024)), bomb, algorithm)
    written = io.BytesIO()
    w = DecompressingWriter(written, algorithm, 1000, label="m:1/bomb")
    with pytest.raises(IntegrityError, match="decompression bomb"):
        w.write(bomb.read_bytes())
    assert len(written.getvalue()) <= 1000


@pytest.mark.parametrize("algorithm", ALGOS)
def test_truncated_stream_is_refused(tmp_path: Path, algorithm: str) -> None:
    """Losing the tail of the stored bytes is detected at close."""
    data = os.urandom(200_000)
    dst = tmp_path / "stored"
    compress_file(payload(tmp_path, data), dst, algorithm)
    with pytest.raises(IntegrityError):
        decompress(dst.read_bytes()[:-100], algorithm, len(data))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_corrupt_stream_is_refused(tmp_path: Path, algorithm: str) -> None:
    """Garbage is an integrity error, not a library exception."""
    with pytest.raises(IntegrityError):
        decompress(os.urandom(5000), algorithm, 5000)


def test_gzip_trailing_data_is_refused() -> None:
    """Bytes after the end of a gzip stream are refused (no smuggled second member)."""
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    stream = comp.compress(b"hello") + comp.flush()
    with pytest.raises(IntegrityError, match="after the end"):
        decompress(stream + stream, "gzip", 5, step=len(stream) * 2)


def test_unknown_algorithm_is_refused(tmp_path: Path) -> None:
    """Only zstd and gzip are accepted."""
    with pytest.raises(InvalidRequest, match="unknown compression"):
        compress_file(payload(tmp_path, b"x"), tmp_path / "o", "lz4")
