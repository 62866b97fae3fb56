"""What the serving process accepts from a model worker's memory file and headers."""

from __future__ import annotations

import fcntl
import os

import numpy as np
import pytest

from serving.isolation.shm import Arena, ProtocolViolation, map_peer, pack, unpack


def test_tensors_round_trip_numbers_strings_and_bytes() -> None:
    arena = Arena("t")
    tensors = {
        "f": np.arange(12, dtype=np.float32).reshape(3, 4),
        "s": np.array(["setosa", "virginica"], dtype=object),
        "b": np.array([b"\x00x", b""], dtype=object),
        "u": np.array(["ab", "c"]),
    }
    headers, replaced = pack(tensors, arena)
    assert replaced
    assert arena.view is not None
    out = unpack(headers, arena.view, copy=True)
    np.testing.assert_array_equal(out["f"], tensors["f"])
    assert list(out["s"]) == ["setosa", "virginica"]
    assert list(out["b"]) == [b"\x00x", b""]
    assert list(out["u"]) == ["ab", "c"]
    arena.close()


@pytest.mark.parametrize(
    "head",
    [
        {"name": "x", "dtype": "|O8", "shape": [1], "offset": 0, "nbytes": 8},
        {"name": "x", "dtype": "<U0", "shape": [10**9], "offset": 0, "nbytes": 0},
        {"name": "x", "dtype": "[('a', '<f8')]", "shape": [1], "offset": 0, "nbytes": 8},
        {"name": "x", "dtype": "<f8", "shape": [2**40], "offset": 0, "nbytes": 2**43},
        {"name": "x", "dtype": "<f8", "shape": [1], "offset": -8, "nbytes": 8},
        {"name": "x", "dtype": "<f8", "shape": [2], "offset": 0, "nbytes": 8},
        {"name": "x", "dtype": "<f8", "shape": [1] * 33, "offset": 0, "nbytes": 8},
        {"name": "x", "dtype": "<i8", "shape": [3], "offset": 0, "nbytes": 24, "ragged": "str"},
    ],
)
def test_a_header_that_does_not_describe_a_tensor_inside_the_file_is_refused(head: dict[str, object]) -> None:
    arena = Arena("t")
    arena.ensure(64)
    with pytest.raises(ProtocolViolation):
        unpack([head], arena.view, copy=True)
    arena.close()


def test_a_peer_file_that_can_shrink_or_is_too_large_is_not_mapped() -> None:
    unsealed = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, 4096)
    with pytest.raises(ProtocolViolation, match="shrink"):
        map_peer(unsealed)
    os.close(unsealed)
    big = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 1 << 40)  # NOTE: costs nothing until written; it would cost our address space
    fcntl.fcntl(big, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    with pytest.raises(ProtocolViolation, match="over the limit"):
        map_peer(big, max_size=1 << 20)
    os.close(big)


def test_our_own_files_cannot_be_grown_or_shrunk_by_the_reader() -> None:
    arena = Arena("t")
    arena.ensure(10)
    for size in (0, arena.size * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(arena.fd, size)
    arena.close()
