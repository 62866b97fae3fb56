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

    Every class in it is on the allowlist and the loaded-model check does not
    look inside neighbours trees, so the load passes in-process checks; the
    first predict (the warm-up) reads out of bounds in native code and dies
    with SIGSEGV. Isolation is what contains it. The example row is 4 features.
    """
    from sklearn.neighbors import KNeighborsClassifier

    x = np.random.default_rng(0).normal(size=(40, 4))
    model = KNeighborsClassifier(n_neighbors=3, algorithm="kd_tree").fit(x, np.repeat([0, 1], 20))
    state = list(model._tree.__getstate__())
    state[1] = np.full_like(state[1], 10**12)  # idx_array
    model._tree.__setstate__(tuple(state))
    joblib.dump(model, path)
    return path


def good_iris(path: Path) -> Path:
    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=300).fit(x, y), path)
    return path
