"""Envelope encryption: chunked AES-GCM bound to model, version, path, index and end."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest

from serving.crypto import MAGIC, Context, DecryptingWriter, Keyring, LocalKek, encrypt_file, generate_kek
from serving.errors import IntegrityError, InvalidRequest

CTX = Context("iris", "3", "model.joblib")
CHUNK = 1024


@pytest.fixture
def kek(tmp_path: Path) -> LocalKek:
    generate_kek(tmp_path / "kek")
    return LocalKek.from_file(tmp_path / "kek")


def encrypt(tmp_path: Path, kek: LocalKek, data: bytes, ctx: Context = CTX) -> bytes:
    src, dst = tmp_path / "plain", tmp_path / "enc"
    src.write_bytes(data)
    encrypt_file(src, dst, kek, ctx, chunk_size=CHUNK)
    return dst.read_bytes()


def decrypt(stored: bytes, kek: LocalKek, ctx: Context = CTX, step: int = 333) -> bytes:
    out = io.BytesIO()
    w = DecryptingWriter(out, Keyring([kek]), ctx)
    for i in range(0, len(stored), step):
        w.write(stored[i : i + step])
    w.close()
    return out.getvalue()


def records(stored: bytes) -> tuple[bytes, list[bytes]]:
    (hlen,) = struct.unpack(">H", stored[len(MAGIC) : len(MAGIC) + 2])
    head = stored[: len(MAGIC) + 2 + hlen]
    body = stored[len(head) :]
    size = 12 + CHUNK + 16
    return head, [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK])
def test_round_trip(tmp_path: Path, kek: LocalKek, size: int) -> None:
    """Any size, including empty and exact chunk multiples, decrypts to the same bytes."""
    data = os.urandom(size)
    stored = encrypt(tmp_path, kek, data)
    if size >= 64:
        assert data[:64] not in stored
    assert decrypt(stored, kek) == data


def test_key_file_is_0600_and_never_printed(tmp_path: Path, kek: LocalKek) -> None:
    """generate_kek writes 0600; repr shows only a fingerprint."""
    assert (tmp_path / "kek").stat().st_mode & 0o777 == 0o600
    secret = (tmp_path / "kek").read_text().strip()
    assert secret not in repr(kek)
    assert repr(kek).startswith("LocalKek(local:")


def test_reordered_chunks_are_refused(tmp_path: Path, kek: LocalKek) -> None:
    """Swapping two chunks breaks authentication."""
    head, recs = records(encrypt(tmp_path, kek, os.urandom(3 * CHUNK + 5)))
    recs[0], recs[1] = recs[1], recs[0]
    with pytest.raises(IntegrityError, match="chunk 0"):
        decrypt(head + b"".join(recs), kek)


def test_truncation_at_a_chunk_boundary_is_refused(tmp_path: Path, kek: LocalKek) -> None:
    """Dropping the last chunk leaves a non-final chunk last, which is refused."""
    head, recs = records(encrypt(tmp_path, kek, os.urandom(3 * CHUNK + 5)))
    with pytest.raises(IntegrityError, match="truncated"):
        decrypt(head + b"".join(recs[:-1]), kek)


def test_extended_stream_is_refused(tmp_path: Path, kek: LocalKek) -> None:
    """Appending a copy of a chunk after the final one is refused."""
    head, recs = records(encrypt(tmp_path, kek, os.urandom(2 * CHUNK + 5)))
    with pytest.raises(IntegrityError):
        decrypt(head + b"".join([*recs, recs[0]]), kek)


def test_ciphertext_of_another_version_is_refused(tmp_path: Path, kek: LocalKek) -> None:
    """A file encrypted for iris:2 does not decrypt as iris:3."""
    stored = encrypt(tmp_path, kek, b"weights", Context("iris", "2", "model.joblib"))
    with pytest.raises(IntegrityError):
        decrypt(stored, kek)


def test_flipped_bit_is_refused(tmp_path: Path, kek: LocalKek) -> None:
    """One changed ciphertext bit fails authentication before any plaintext is written."""
    stored = bytearray(encrypt(tmp_path, kek, os.urandom(CHUNK // 2)))
    stored[-20] ^= 1
    out = io.BytesIO()
    w = DecryptingWriter(out, Keyring([kek]), CTX)
    w.write(bytes(stored))
    assert out.getvalue() == b""  # the only (final) chunk is held back until close
    with pytest.raises(IntegrityError):
        w.close()
    assert out.getvalue() == b""


def test_wrong_key_names_the_expected_key(tmp_path: Path, kek: LocalKek) -> None:
    """Decrypting without the right KEK says which key id is needed, not the key."""
    stored = encrypt(tmp_path, kek, b"weights")
    other = LocalKek(os.urandom(32))
    with pytest.raises(InvalidRequest, match=kek.kek_id):
        decrypt(stored, other)


def test_bad_key_text_is_refused() -> None:
    """A key that is not base64 of 32 bytes is refused with a message naming no bytes."""
    with pytest.raises(InvalidRequest, match="32 bytes"):
        LocalKek.from_text("c2hvcnQ=")
