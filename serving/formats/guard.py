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
- a fitted decision tree (``sklearn.tree._tree.Tree``) or histogram-gradient-boosting
  predictor whose node arrays point outside themselves or at features the
  model does not have, which native predict code would follow out of bounds.

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
    stack: list[tuple[Any, str]] = [(obj, "model")]
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
            if node.dtype.hasobject:
                stack.extend((item, f"{where}[...]") for item in node.ravel().tolist())
            continue
        if isinstance(node, np.generic | np.dtype):
            continue
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, f"{where} key"))
                stack.append((v, f"{where}[{k!r}]"))
            continue
        if isinstance(node, list | tuple | set | frozenset):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
            continue
        _check_object(node, where, source)
        attrs = getattr(node, "__dict__", None)
        if isinstance(attrs, dict):
            stack.extend((v, f"{where}.{k}") for k, v in attrs.items() if not _own_method(node, v))


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


def _check_class_value(cls: type, where: str, source: str) -> None:
    if issubclass(cls, np.generic):
        return
    raise UntrustedArtifact(
        f"{source}: {where} holds the class {qualified_name(cls)!r} as a value; a model would call it "
        "at predict time (only numpy scalar types are admitted as values)"
    )


def _check_callable(fn: Any, where: str, admits: Callable[[str], bool], source: str) -> None:
    target = fn.func if isinstance(fn, functools.partial) else fn
    name = qualified_name(target)
    if isinstance(fn, functools.partial) or not admits(name):
        raise UntrustedArtifact(
            f"{source}: {where} is the callable {name!r}, which the model would call at predict time; "
            "add it to SERVING_TRUSTED_GLOBALS only if you trust it like code"
        )


def _check_object(node: Any, where: str, source: str) -> None:
    cls = type(node)
    vectorizer = callable(getattr(cls, "build_analyzer", None))
    if vectorizer and getattr(node, "input", _SAFE_VECTORIZER_INPUT) != _SAFE_VECTORIZER_INPUT:
        raise UntrustedArtifact(
            f"{source}: {where} is a {cls.__name__} with input={node.input!r}, which opens the "
            "paths clients send; only input='content' is admitted"
        )
    _check_feature_counts(node, where, source)
    module = cls.__module__
    if module == "sklearn.tree._tree" and cls.__name__ == "Tree":
        _check_tree(node, where, source)
    elif module.endswith("_hist_gradient_boosting.predictor") and cls.__name__ == "TreePredictor":
        _check_hist_predictor(node, where, source)


def _check_feature_counts(est: Any, where: str, source: str) -> None:
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


def _bad_tree(source: str, where: str, why: str) -> UntrustedArtifact:
    return UntrustedArtifact(f"{source}: {where} is a malformed tree ({why}); refusing to run it")


def _check_links(left: np.ndarray, right: np.ndarray, leaf: np.ndarray, count: int) -> str | None:
    """Children of internal nodes come later in the arrays and inside them; leaves have none."""
    index = np.arange(count)
    inner = ~leaf
    for side, child in (("left", left), ("right", right)):
        if np.any(child[inner] <= index[inner]) or np.any(child[inner] >= count):
            return f"a {side} child points outside the tree or backwards"
    return None


def _check_tree(tree: Any, where: str, source: str) -> None:
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


def _check_hist_predictor(pred: Any, where: str, source: str) -> None:
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
