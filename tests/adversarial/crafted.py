"""Crafted versions a publisher can write with nothing but the frameworks' own tools.

Each builder writes one artifact (every class in it is one a model may hold) and
returns ``(path, format, publish kwargs)``. Unchecked, each one crashed, hung, read
the heap of, or blew up the memory of the process that served it (issue 20).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np

Case = tuple[Path, str, dict[str, Any]]
ROW4 = [[0.5, 0.5, 0.5, 0.5]]


def _kd_tree(work: Path, name: str, seed: int, change: Callable[[list[Any]], None]) -> Case:
    """A fitted KNeighborsClassifier whose KD-tree state ``change`` edited (the list of
    ``__getstate__``: [1] is ``idx_array``, [2] ``node_data``), joblib-dumped as ``name``."""
    from sklearn.neighbors import KNeighborsClassifier

    x = np.random.default_rng(seed).normal(size=(64, 4))
    model = KNeighborsClassifier(n_neighbors=3, algorithm="kd_tree", leaf_size=4).fit(
        x, np.repeat([0, 1], 32)
    )
    state = list(model._tree.__getstate__())
    change(state)
    model._tree.__setstate__(tuple(state))
    path = work / name
    joblib.dump(model, path)
    return path, "sklearn", {"example": ROW4}


def kd_tree_bad_leaf(work: Path) -> Case:
    """Out-of-range indices only in the last leaf, which the example row never reaches:
    the isolation probe and warm-up pass, and a request that reaches the leaf crashes."""

    def change(state: list[Any]) -> None:
        idx, last = state[1].copy(), state[2][-1]
        idx[int(last["idx_start"]) : int(last["idx_end"])] = 10**12
        state[1] = idx

    return _kd_tree(work, "kd-leaf.joblib", 0, change)


def kd_tree_bad_node_range(work: Path) -> Case:
    """A case of our own: the indices are fine, a leaf's idx_end is past them."""

    def change(state: list[Any]) -> None:
        state[2] = state[2].copy()
        state[2]["idx_end"][-1] = 10**9

    return _kd_tree(work, "kd-range.joblib", 1, change)


def kd_tree_inner_node_without_children(work: Path) -> Case:
    """A case of our own: the last node says it is not a leaf, so a query descends
    to children 2i+1 and 2i+2 past the node array."""

    def change(state: list[Any]) -> None:
        state[2] = state[2].copy()
        state[2]["is_leaf"][-1] = 0

    return _kd_tree(work, "kd-inner.joblib", 2, change)


def sparse_coef_heap_read(work: Path) -> Case:
    """A linear model whose ``coef_`` is a CSR matrix with out-of-range column indices:
    each predict gathers from past the end of the input row, i.e. from the heap."""
    from scipy import sparse
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    coef = sparse.csr_matrix(model.coef_)
    coef.indices = (coef.indices + 50_000).astype(coef.indices.dtype)
    model.coef_ = coef
    path = work / "sparse.joblib"
    joblib.dump(model, path)
    return path, "sklearn", {}


def sparse_indptr_past_data(work: Path) -> Case:
    """A case of our own: the indices are in range, ``indptr`` runs past ``data``."""
    from scipy import sparse
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    coef = sparse.csr_matrix(model.coef_)
    coef.indptr = coef.indptr.copy()
    coef.indptr[-1] = 10**6
    model.coef_ = coef
    path = work / "indptr.joblib"
    joblib.dump(model, path)
    return path, "sklearn", {}


def _text_pipeline(**vectorizer: Any) -> Any:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(CountVectorizer(), LogisticRegression(max_iter=200))
    pipe.fit(["good movie", "bad movie", "great film", "awful film"], [1, 0, 1, 0])
    pipe[0].set_params(**vectorizer)
    return pipe


def vectorizer_ngram_bomb(work: Path) -> Case:
    """``ngram_range=(1, 10**6)``: a 2.5 KB request took 2.6 GB and 9.5 s."""
    path = work / "ngram.joblib"
    joblib.dump(_text_pipeline(ngram_range=(1, 10**6)), path)
    return path, "sklearn", {}


def vectorizer_char_ngram_bomb(work: Path) -> Case:
    """A case of our own: the same through character n-grams."""
    path = work / "char-ngram.joblib"
    joblib.dump(_text_pipeline(analyzer="char", ngram_range=(1, 4096)), path)
    return path, "sklearn", {}


def torch_zero_stride_weights(work: Path) -> Case:
    """An 840-byte-class file: one stored float expanded to a 4096x4096 weight with strides
    (0, 0); the old size check counted its elements as stored, and loading it into the
    module held the full size."""
    import torch

    weight = torch.zeros(1).expand(4096, 4096)
    path = work / "stride0.pt"
    torch.save({"weight": weight, "bias": torch.zeros(1).expand(4096)}, path)
    options = {"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 4096, "out_features": 4096}}
    return path, "torch-state-dict", {"options": options}


def torch_overlapping_weights(work: Path) -> Case:
    """A case of our own: strides (1, 1), each row one element on from the last, so 4096x4096
    elements overlap in 8191 stored floats (no stride is zero)."""
    import torch

    base = torch.zeros(2 * 4096 - 1)
    weight = base.as_strided((4096, 4096), (1, 1))
    path = work / "overlap.pt"
    torch.save({"weight": weight, "bias": torch.zeros(4096)}, path)
    options = {"class_path": "torch.nn:Linear", "init_kwargs": {"in_features": 4096, "out_features": 4096}}
    return path, "torch-state-dict", {"options": options}
