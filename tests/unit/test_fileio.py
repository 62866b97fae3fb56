"""The one file hash: every byte, in large reads, and never past one byte over what is expected."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from serving.fileio import READ_CHUNK, hash_file


@pytest.mark.parametrize("size", [0, 1, READ_CHUNK - 1, READ_CHUNK, 2 * READ_CHUNK + 3])
def test_a_file_hashes_to_its_bytes_sha256(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(path) == (size, hashlib.sha256(data).hexdigest())
    assert hash_file(path, size) == (size, hashlib.sha256(data).hexdigest())


def test_a_longer_file_than_expected_is_read_one_byte_past_it(tmp_path: Path) -> None:
    data = os.urandom(READ_CHUNK + 100)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert hash_file(path, 10) == (11, hashlib.sha256(data[:11]).hexdigest())
    assert hash_file(path, READ_CHUNK + 5) == (
        READ_CHUNK + 6,
        hashlib.sha256(data[: READ_CHUNK + 6]).hexdigest(),
    )


def test_only_a_regular_file_is_hashed(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/dev/zero")
    with pytest.raises(OSError, match="symbolic links") as link:
        hash_file(tmp_path / "link")
    assert link.value.errno == errno.ELOOP
    with pytest.raises(OSError, match="not a regular file"):
        hash_file(Path("/dev/zero"))
