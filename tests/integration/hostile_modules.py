"""Hostile artifacts and torch modules that misbehave when built, for the isolation tests.

A torch state dict's ``class_path`` names installed code that runs when the
module is built (SECURITY.md); these stand for such code, reached through the
real ``torch-state-dict`` loader with an empty state dict. The class path is
``hostile_modules:Segfault`` (and so on), as for ``tiny_models``.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier


class Segfault(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class Spin(torch.nn.Module):
    """Burns CPU for ever."""

    def __init__(self) -> None:
        super().__init__()
        n = 0
        while True:
            n += 1


class Hang(torch.nn.Module):
    """Waits for ever without using CPU."""

    def __init__(self) -> None:
        super().__init__()
        while True:
            time.sleep(1)


class Exec(torch.nn.Module):
    """Tries to run a shell command that would create ``sentinel``."""

    def __init__(self, sentinel: str) -> None:
        super().__init__()
        os.system(f"touch {sentinel}")  # noqa: S605 -- NOTE: the attack under test


class ShowEnv(torch.nn.Module):
    """Fails with the value of an environment variable in its message."""

    def __init__(self, name: str) -> None:
        super().__init__()
        raise ValueError(f"env {name}={os.environ.get(name, '<unset>')}")


def crafted_tree(path: Path) -> Path:
    """A real fitted tree whose root's children point far outside its node array."""
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    clf = DecisionTreeClassifier().fit(x, [0, 0, 1, 1])
    state = clf.tree_.__getstate__()
    nodes = state["nodes"].copy()
    nodes["left_child"][0] = nodes["right_child"][0] = 1 << 40
    state["nodes"] = nodes
    clf.tree_.__setstate__(state)
    joblib.dump(clf, path)
    return path


def crafted_kd_tree(path: Path) -> Path:
    """A fitted KNeighborsClassifier whose KD-tree indices point far outside its data.

    Every class in it is on the allowlist. Unchecked, the first predict (the warm-up)
    reads out of bounds in native code and dies with SIGSEGV; the loaded-model check
    now refuses its ``idx_array`` before anything runs. The example row is 4 features.
    """
    from sklearn.neighbors import KNeighborsClassifier

    x = np.random.default_rng(0).normal(size=(40, 4))
    model = KNeighborsClassifier(n_neighbors=3, algorithm="kd_tree").fit(x, np.repeat([0, 1], 20))
    state = list(model._tree.__getstate__())
    state[1] = np.full_like(state[1], 10**12)  # idx_array
    model._tree.__setstate__(tuple(state))
    joblib.dump(model, path)
    return path


def segfault_version(path: Path) -> tuple[Path, dict[str, Any]]:
    """A version whose load dies with SIGSEGV in native code, past every check a loader
    makes: an (empty) state dict for ``hostile_modules:Segfault``. Publish it as
    ``publish_path(repo, path, name, format="torch-state-dict", **kwargs)``; whoever loads
    it must have this folder on its path."""
    torch.save({}, path)
    return path, {"options": {"class_path": "hostile_modules:Segfault", "init_kwargs": {}}}


def good_iris(path: Path) -> Path:
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
    return path


def hostile_versions(work: Path) -> dict[str, tuple[Path, str, dict[str, Any]]]:
    """Every class of crafted version the trust-boundary corpus has: case -> (path, format, publish kwargs).

    The builders live with the corpus (tests/security/corpus.py); each would run
    code, read a server file, crash, or exhaust memory if it were loaded unchecked.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from security import corpus
    finally:
        sys.path.pop(0)
    import skops.io as sio

    t = corpus.Sentinel(work / "PWNED", work / "canary", work / "script.py")
    out: dict[str, tuple[Path, str, dict[str, Any]]] = {}
    gadget = work / "gadget.joblib"
    gadget.write_bytes(corpus.pickle_of(corpus.scipy_distribution_gadget(t)))
    out["admitted-class gadget"] = (gadget, "sklearn", {})
    reader = work / "reader.skops"
    sio.dump(corpus.vectorizer_reading_files(), reader)
    out["skops file read"] = (reader, "skops", {})
    crash, crash_kwargs = segfault_version(work / "segfault.pt")
    out["native crash"] = (crash, "torch-state-dict", crash_kwargs)
    out["kd-tree out of range"] = (crafted_kd_tree(work / "kd.joblib"), "sklearn", {"example": [[0.5] * 4]})
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adversarial"))
    try:
        import crafted
    finally:
        sys.path.pop(0)
    out["sparse coef heap read"] = crafted.sparse_coef_heap_read(work)
    out["vectorizer n-gram bomb"] = crafted.vectorizer_ngram_bomb(work)
    xz = work / "xz.joblib"
    corpus.write_xz_joblib_bomb(xz, 160 * 1024 * 1024)
    out["xz bomb"] = (xz, "sklearn", {})
    schema = work / "schema.skops"
    corpus.write_skops_schema_bomb(schema, 200 * 1024 * 1024)
    out["skops schema bomb"] = (schema, "skops", {})
    pt = work / "tiny.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), pt)
    options = {"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 16384, "out_features": 16384}}
    out["torch init_kwargs bomb"] = (pt, "torch-state-dict", {"options": options})
    alloc = work / "alloc.pkl"
    alloc.write_bytes(b"\x80\x04cbuiltins\nbytearray\n(J" + (2**31 - 1).to_bytes(4, "little") + b"tR.")
    out["allocation bomb"] = (alloc, "pickle", {})
    onnx_dir = work / "sparse-onnx"
    onnx_dir.mkdir()
    corpus.onnx_with_sparse_external_data(onnx_dir / "model.onnx", "../../../outside.bin")
    out["sparse external data"] = (onnx_dir, "onnx", {})
    out["keras Lambda over keras.ops.zeros"] = crafted.keras_lambda_zeros(work)
    out["ONNX constant-fold bomb"] = crafted.onnx_constant_fold_bomb(work)
    return out


def point_alias_at_oversized_manifest(repo: Any, name: str, version: str, alias: str = "production") -> None:
    """What a bucket writer can do on any store: pad ``version``'s manifest past the 4 MiB cap,
    then write the alias object by hand (``move_alias`` itself refuses to read such a manifest)."""
    from serving.manifest import MANIFEST_NAME, sha256_bytes

    key = repo.version_prefix(name, version) + MANIFEST_NAME
    raw, _ = repo.store.get(key)
    padded = raw + b" " * (5 * 1024 * 1024)
    repo.store.put(key, padded)
    moved = repo.get_alias(name, alias).moved_to(version, sha256_bytes(padded), "attacker")
    repo.store.put(repo.alias_key(name, alias), moved.to_json())


class Sleepy(torch.nn.Module):
    """A request-controlled hang, as an ONNX ``Loop`` whose trip count comes from the
    request: ``forward`` sleeps for as many seconds as the first input value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(x.reshape(-1)[0]))
        return x * 2


class CrashOnNegative(torch.nn.Module):
    """Answers ``2 * x``, and dies with SIGSEGV when the first input value is negative:
    a request that crashes native code, after any number of good ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.reshape(-1)[0]) < 0:
            ctypes.string_at(0)
        return x * 2


class SignalsItsParent(torch.nn.Module):
    """Answers ``2 * x``, and sends SIGKILL to its parent process (a model worker's zygote, or
    the serving process) when the first input value is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.reshape(-1)[0]) < 0:
            os.kill(os.getppid(), 9)
        return x * 2


class PidfdSignalsItsParent(torch.nn.Module):
    """As :class:`SignalsItsParent`, through a pidfd (which raises no audit event)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.reshape(-1)[0]) < 0:
            import signal

            signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)
        return x * 2


class Hog(torch.nn.Module):
    """Allocates as many GiB as the first input value, then answers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = bytearray(int(float(x.reshape(-1)[0]) * 1024**3))
        return x * 2 + len(held) * 0


class Cyclic(torch.nn.Module):
    """Answers ``2 * x``, holding 100 MB (touched) that only a garbage collection frees: the
    module refers to itself, as a Keras model's layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.held = torch.ones(25_000_000)  # NOTE: a plain attribute, not saved with the state
        self.loop = {"me": self}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2
