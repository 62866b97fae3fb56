"""What a loaded estimator may hold: the check after a pickle or skops file is built.

The allowlist decides which classes may be *built*; this module decides whether
the objects that were built would, at predict time, do something no model needs.
It walks the whole object graph once, after loading and before warm-up, and
refuses (:class:`serving.errors.UntrustedArtifact`):

- a callable value (function, builtin, ufunc, bound method, ``functools.partial``)
  whose exact name the policy does not admit: ``FunctionTransformer(func=...)``,
  a vectorizer's ``analyzer``/``tokenizer``, a ``metric`` callable. A class as a
  value is admitted only when it is a numpy scalar type (a ``dtype=`` parameter);
- a text vectorizer whose ``input`` is not ``"content"``: with ``"filename"`` or
  ``"file"`` it opens whatever path a client sends;
- a text vectorizer whose ``ngram_range`` passes :data:`MAX_NGRAM` or whose analyzer
  is not one of sklearn's own, which sets what each request costs;
- a fitted decision tree (``sklearn.tree._tree.Tree``) or histogram-gradient-boosting
  predictor whose node arrays point outside themselves or at features the
  model does not have, which native predict code would follow out of bounds;
- a KD-tree or ball tree (nearest neighbours) whose index arrays point outside
  its data, and a sparse matrix (``coef_`` of a linear model, anywhere) whose
  indices are outside its shape or out of order: predict would read the heap.

Example:
    >>> check_loaded(model, admits=lambda name: False, source="model.joblib")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.errors import UntrustedArtifact

__all__ = ["check_loaded", "qualified_name"]

_MAX_NODES = 2_000_000
_SAFE_VECTORIZER_INPUT = "content"
_CALLABLE_TYPES: tuple[type, ...] = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    functools.partial,
    np.ufunc,
    type(np.mean),  # numpy's array-function dispatchers (np.mean, np.sum, ...)
)


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a function, class or ufunc (what pickle and skops record)."""
    if isinstance(obj, np.ufunc):
        return f"numpy.{obj.__name__}"
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', type(obj).__name__))}"


def check_loaded(obj: Any, admits: Callable[[str], bool], source: str) -> None:
    """Refuse ``obj`` when anything it holds would misbehave at predict time.

    Args:
        obj: the object a restricted unpickler or skops built.
        admits: whether a global's exact ``module.qualname`` is admitted (the
            allowlist plus the operator's ``SERVING_TRUSTED_GLOBALS``).
        source: the file name, for messages.

    Raises:
        UntrustedArtifact: what it holds, and where.
    """
    seen: set[int] = set()
    stack: list[tuple[Any, _Path]] = [(obj, _Path(None, "model"))]
    while stack:
        node, where = stack.pop()
        if id(node) in seen or node is None or isinstance(node, str | bytes | int | float | bool | complex):
            continue
        seen.add(id(node))
        if len(seen) > _MAX_NODES:
            raise UntrustedArtifact(f"{source}: the model holds more than {_MAX_NODES} objects")
        if isinstance(node, type):
            _check_class_value(node, where, source)
            continue
        if isinstance(node, _CALLABLE_TYPES):
            _check_callable(node, where, admits, source)
            continue
        if isinstance(node, np.ndarray):
            _check_array(node, where, source)
            if node.dtype.hasobject:
                stack.extend((item, _Path(where, "[...]")) for item in node.ravel().tolist())
            continue
        if isinstance(node, np.generic | np.dtype):
            continue
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, _Path(where, " key")))
                stack.append((v, _Path(where, k, item=True)))
        elif isinstance(node, list | tuple | set | frozenset):
            stack.extend((item, _Path(where, i, item=True)) for i, item in enumerate(node))
        if type(node) in _PLAIN_CONTAINERS:
            continue
        # NOTE: everything else, subclasses of dict and list included (their instance
        # __dict__ can hold a step's `transform`), is checked and walked as an object.
        _check_object(node, where, source)
        attrs = getattr(node, "__dict__", None)
        if isinstance(attrs, dict):
            stack.extend((v, _Path(where, f".{k}")) for k, v in attrs.items() if not _own_method(node, v))


_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})


class _Path:
    """Where a value sits in the model, spelled out only when a message needs it."""

    __slots__ = ("item", "label", "parent")

    def __init__(self, parent: _Path | None, label: object, *, item: bool = False) -> None:
        self.parent, self.label, self.item = parent, label, item

    def __str__(self) -> str:
        parts: list[str] = []
        node: _Path | None = self
        while node is not None:
            parts.append(f"[{node.label!r}]" if node.item else str(node.label))
            node = node.parent
        return "".join(reversed(parts))


def _check_array(array: np.ndarray, where: _Path, source: str) -> None:
    """Unpickled arrays own contiguous data; a strided view (zero strides) is a forged one.

    ``numpy.ndarray(shape, dtype, buffer, 0, strides=(0,))`` makes a huge array
    of a few bytes, which predict code then multiplies row by row.
    """
    if array.ndim > 1 and not (array.flags.c_contiguous or array.flags.f_contiguous):
        raise UntrustedArtifact(
            f"{source}: {where} is a non-contiguous view of {array.nbytes} bytes (arrays unpickled "
            "from real data are contiguous; a forged view can span far more than its buffer); refusing it"
        )
    if array.ndim == 1 and array.size > 1 and array.strides[0] == 0:
        raise UntrustedArtifact(f"{source}: {where} is a zero-stride view; refusing it")


def _own_method(holder: Any, value: Any) -> bool:
    """A method of the holder's own class, stored on it (interp1d's ``self._call``).

    It runs that class's code, which was admitted or built by admitted code; a
    stream cannot name such a function itself, as no allowlist entry is a method.
    """
    if isinstance(value, types.MethodType):
        return value.__self__ is holder
    if isinstance(value, types.FunctionType):
        return getattr(type(holder), value.__name__, None) is value
    return False


def _check_class_value(cls: type, where: _Path, source: str) -> None:
    if issubclass(cls, np.generic):
        return
    raise UntrustedArtifact(
        f"{source}: {where} holds the class {qualified_name(cls)!r} as a value; a model would call it "
        "at predict time (only numpy scalar types are admitted as values)"
    )


def _check_callable(fn: Any, where: _Path, admits: Callable[[str], bool], source: str) -> None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = qualified_name(target)
    if isinstance(fn, functools.partial) or not admits(name):
        raise UntrustedArtifact(
            f"{source}: {where} is the callable {name!r}, which the model would call at predict time; "
            "add it to SERVING_TRUSTED_GLOBALS only if you trust it like code"
        )


def _check_object(node: Any, where: _Path, source: str) -> None:
    cls = type(node)
    vectorizer = callable(getattr(cls, "build_analyzer", None))
    if vectorizer and getattr(node, "input", _SAFE_VECTORIZER_INPUT) != _SAFE_VECTORIZER_INPUT:
        raise UntrustedArtifact(
            f"{source}: {where} is a {cls.__name__} with input={node.input!r}, which opens the "
            "paths clients send; only input='content' is admitted"
        )
    pattern = getattr(node, "token_pattern", None) if vectorizer else None
    if isinstance(pattern, str) and not _linear_regex(pattern):
        raise UntrustedArtifact(
            f"{source}: {where} is a {cls.__name__} whose token_pattern {pattern[:80]!r} can backtrack "
            "for a very long time on a client's text; only patterns whose unbounded repeats are of single "
            "characters (at most two of them) are admitted"
        )
    if vectorizer:
        _check_vectorizer_cost(node, where, source)
    _check_feature_counts(node, where, source)
    module = cls.__module__
    if module == "sklearn.tree._tree" and cls.__name__ == "Tree":
        _check_tree(node, where, source)
    elif module.endswith("_hist_gradient_boosting.predictor") and cls.__name__ == "TreePredictor":
        _check_hist_predictor(node, where, source)
    elif module.startswith("sklearn.neighbors.") and cls.__name__ in _NEIGHBOR_TREES:
        _check_neighbor_tree(node, where, source)
    elif module.startswith("scipy.sparse") and callable(getattr(node, "tocsr", None)):
        _check_sparse(node, where, source)


MAX_NGRAM = 8
"""The longest n-gram a text vectorizer may build per token position (``ngram_range``'s upper
end): a request's cost grows with it, and ``(1, 10**6)`` took a 2.5 KB request to 2.6 GB."""
_ANALYZERS = frozenset({"word", "char", "char_wb"})
_NEIGHBOR_TREES = frozenset({"KDTree", "BallTree", "BinaryTree", "BinaryTree64", "BinaryTree32"})


def _check_vectorizer_cost(node: Any, where: _Path, source: str) -> None:
    """Bound what a vectorizer's hyperparameters make each request cost."""
    name = type(node).__name__
    ngram = getattr(node, "ngram_range", (1, 1))
    ok = (
        isinstance(ngram, tuple | list)
        and len(ngram) == 2
        and all(isinstance(n, int | np.integer) and not isinstance(n, bool) for n in ngram)
        and 1 <= int(ngram[0]) <= int(ngram[1]) <= MAX_NGRAM
    )
    if not ok:
        raise UntrustedArtifact(
            f"{source}: {where}.ngram_range of this {name} is {ngram!r:.80}; the limit is "
            f"1 <= min_n <= max_n <= {MAX_NGRAM} (every request pays for each n-gram length)"
        )
    analyzer = getattr(node, "analyzer", "word")
    if isinstance(analyzer, str) and analyzer not in _ANALYZERS:
        raise UntrustedArtifact(
            f"{source}: {where}.analyzer of this {name} is {analyzer[:40]!r}; only "
            f"{sorted(_ANALYZERS)} are admitted"
        )


def _check_neighbor_tree(tree: Any, where: _Path, source: str) -> None:
    """A KD-tree or ball tree's index arrays are followed natively at query time: all in range."""
    try:
        data, idx, node_data, node_bounds = (np.asarray(a) for a in tree.get_arrays())
    except Exception as exc:  # NOTE: an unreadable tree is refused, not raised
        raise _bad_tree(source, where, f"its arrays cannot be read ({type(exc).__name__})") from exc
    n = int(data.shape[0]) if data.ndim == 2 else -1
    if n < 0 or idx.ndim != 1 or len(idx) != n:
        raise _bad_tree(source, where, f"idx_array has {len(idx)} entries for {n} samples")
    if n and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise _bad_tree(source, where, f"idx_array points outside 0..{n - 1}")
    if node_data.ndim != 1 or len(node_data) == 0:
        raise _bad_tree(source, where, "node_data is empty")
    start = np.asarray(node_data["idx_start"], dtype=np.int64)
    end = np.asarray(node_data["idx_end"], dtype=np.int64)
    if np.any(start < 0) or np.any(end > n) or np.any(start > end):
        raise _bad_tree(source, where, f"a node's idx_start..idx_end is outside 0..{n}")
    inner = np.flatnonzero(~np.asarray(node_data["is_leaf"]).astype(bool))
    if len(inner) and 2 * int(inner.max()) + 2 >= len(node_data):
        # NOTE: queries descend from node i to 2i+1 and 2i+2 without a bounds check.
        raise _bad_tree(source, where, f"an inner node's children are past the {len(node_data)} nodes")
    if (
        node_bounds.ndim < 2
        or node_bounds.shape[-2] < len(node_data)
        or node_bounds.shape[-1] != data.shape[1]
    ):
        raise _bad_tree(
            source, where, f"node_bounds has shape {node_bounds.shape} for {len(node_data)} nodes"
        )


def _check_sparse(matrix: Any, where: _Path, source: str) -> None:
    """Sparse matrices hold index arrays that products follow natively: every index in range."""
    try:
        shape = tuple(int(d) for d in matrix.shape)
        if hasattr(matrix, "indptr"):
            matrix.check_format(full_check=True)
        elif hasattr(matrix, "row") and hasattr(matrix, "col"):  # coo
            rows, cols = np.asarray(matrix.row), np.asarray(matrix.col)
            data = np.asarray(matrix.data)
            if not (len(rows) == len(cols) == len(data)):
                raise ValueError("row, col and data lengths differ")
            if len(rows) and (
                rows.min() < 0 or rows.max() >= shape[0] or cols.min() < 0 or cols.max() >= shape[1]
            ):
                raise ValueError("an index is outside the shape")
        else:
            matrix.tocsr().check_format(full_check=True)
    except UntrustedArtifact:
        raise
    except Exception as exc:  # NOTE: any malformation is a refusal
        raise UntrustedArtifact(
            f"{source}: {where} is a malformed sparse matrix ({type(exc).__name__}: {str(exc)[:200]}); "
            "its indices must lie inside its shape"
        ) from exc


def _linear_regex(pattern: str) -> bool:
    """A conservative test for patterns that cannot backtrack catastrophically.

    Unbounded repeats may only repeat one character class, and a pattern may
    have at most two of them: sklearn's default ``(?u)\\b\\w\\w+\\b`` passes,
    ``(?:.|\\s)*...`` (a repeated alternation) and ``.*.*.*x`` do not.
    """
    import importlib

    # NOTE: the standard library's own regex parser, not a copy of its grammar.
    c: Any = importlib.import_module("re._constants")
    _parser: Any = importlib.import_module("re._parser")
    try:
        parsed = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 -- NOTE: a pattern re cannot compile is refused, not raised
        return False
    single = {c.LITERAL, c.NOT_LITERAL, c.IN, c.ANY, c.CATEGORY}
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT}
    unbounded = 0
    stack = [parsed]
    while stack:
        for op, arg in stack.pop():
            if op in repeats:
                _low, high, body = arg
                if high == c.MAXREPEAT:
                    unbounded += 1
                if any(sub_op not in single for sub_op, _ in body):
                    return False
            elif op is c.SUBPATTERN:
                stack.append(arg[-1])
            elif op is c.BRANCH:
                stack.extend(arg[1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                stack.append(arg[1])
    return unbounded <= 2


def _check_feature_counts(est: Any, where: _Path, source: str) -> None:
    """Trees index the client's columns natively: their features must fit ``n_features_in_``."""
    n_in = getattr(est, "n_features_in_", None)
    if not isinstance(n_in, int | np.integer):
        return
    tree = est.__dict__.get("tree_")
    if tree is not None and type(tree).__name__ == "Tree" and int(tree.n_features) != int(n_in):
        raise _bad_tree(source, f"{where}.tree_", f"it has {tree.n_features} features, the model {n_in}")
    for i, predictors in enumerate(est.__dict__.get("_predictors") or ()):
        for j, pred in enumerate(predictors):
            nodes = np.asarray(getattr(pred, "nodes", ()))
            if len(nodes) and np.any(nodes["feature_idx"][~nodes["is_leaf"].astype(bool)] >= n_in):
                raise _bad_tree(source, f"{where}._predictors[{i}][{j}]", f"a split uses a feature >= {n_in}")


def _bad_tree(source: str, where: object, why: str) -> UntrustedArtifact:
    return UntrustedArtifact(f"{source}: {where} is a malformed tree ({why}); refusing to run it")


def _check_links(left: np.ndarray, right: np.ndarray, leaf: np.ndarray, count: int) -> str | None:
    """Children of internal nodes come later in the arrays and inside them; leaves have none."""
    index = np.arange(count)
    inner = ~leaf
    for side, child in (("left", left), ("right", right)):
        if np.any(child[inner] <= index[inner]) or np.any(child[inner] >= count):
            return f"a {side} child points outside the tree or backwards"
    return None


def _check_tree(tree: Any, where: _Path, source: str) -> None:
    count = int(tree.node_count)
    left, right = np.asarray(tree.children_left), np.asarray(tree.children_right)
    feature, n_features = np.asarray(tree.feature), int(tree.n_features)
    if count < 0 or not (len(left) == len(right) == len(feature) == count):
        raise _bad_tree(source, where, "node arrays disagree with node_count")
    if count == 0:
        return
    leaf = left == -1
    if np.any(leaf != (right == -1)):
        raise _bad_tree(source, where, "a node has exactly one child")
    why = _check_links(left, right, leaf, count)
    if why is not None:
        raise _bad_tree(source, where, why)
    if np.any(feature[~leaf] < 0) or np.any(feature[~leaf] >= n_features):
        raise _bad_tree(source, where, f"a split uses a feature outside 0..{n_features - 1}")
    value = np.asarray(tree.value)
    if value.shape[0] != count:
        raise _bad_tree(source, where, "the value array disagrees with node_count")


def _check_hist_predictor(pred: Any, where: _Path, source: str) -> None:
    nodes = np.asarray(pred.nodes)
    count = len(nodes)
    if count == 0:
        raise _bad_tree(source, where, "it has no nodes")
    leaf = nodes["is_leaf"].astype(bool)
    why = _check_links(nodes["left"].astype(np.int64), nodes["right"].astype(np.int64), leaf, count)
    if why is not None:
        raise _bad_tree(source, where, why)
    bitsets = getattr(pred, "raw_left_cat_bitsets", None)
    if bitsets is not None and np.any(nodes["is_categorical"][~leaf]):
        idx = nodes["bitset_idx"][~leaf & nodes["is_categorical"].astype(bool)]
        if np.any(idx >= len(bitsets)):
            raise _bad_tree(source, where, "a categorical split points outside its bitsets")
