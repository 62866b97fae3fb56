"""The exact pickle allowlist: what it admits is audited, and real models still load.

Every admitted class is a callable whose ``__new__``, ``__init__``,
``__setstate__``, ``__reduce__``/``__reduce_ex__`` and ``__setattr__`` run with
arguments a pickle chooses. A test here fails when any of them is code nobody
reviewed: Python methods are accepted when they only store their arguments
(sklearn's estimator ``__init__`` convention, checked on the syntax tree) or when
their source digest is on :data:`AUDITED`; native (C/Cython) ones only when named
on it. Upgrading numpy, scipy or scikit-learn shows up here as a diff to review.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import pickle
import sys
import textwrap
import types
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from serving.errors import UntrustedArtifact
from serving.formats import guard
from serving.formats.base import LoadPolicy
from serving.formats.skops_io import load_skops
from serving.formats.unpickler import ALLOWLIST_FILE, STANDARD_GLOBALS, admitted_globals, load_joblib, loads

ROOT = Path(__file__).resolve().parents[3]
METHODS = ("__new__", "__init__", "__setstate__", "__reduce__", "__reduce_ex__", "__setattr__")
AUDIT_FILE = ALLOWLIST_FILE.with_name("pickle_audit.txt")


def _audited() -> dict[str, str]:
    """``owner.method`` -> ``native``, ``generated`` or the sha256 prefix of the reviewed source."""
    out = {}
    for line in AUDIT_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, digest = line.split()
            out[key] = digest
    return out


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    while module:
        try:
            obj: Any = importlib.import_module(module)
            break
        except ImportError:
            module, _, head = module.rpartition(".")
            name = f"{head}.{name}"
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _stores_arguments_only(fn: types.FunctionType) -> bool:
    """``self.x = x`` and ``super().__init__(x, y=y)`` only, as sklearn's convention asks."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    if not isinstance(tree, ast.FunctionDef):
        return False
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    plain = (ast.Name, ast.Constant)
    for st in body:
        if (
            isinstance(st, ast.Assign)
            and len(st.targets) == 1
            and isinstance(st.targets[0], ast.Attribute)
            and isinstance(st.targets[0].value, ast.Name)
            and st.targets[0].value.id == "self"
            and isinstance(st.value, plain)
        ):
            continue
        call = st.value if isinstance(st, ast.Expr) else None
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "__init__"
            and isinstance(call.func.value, ast.Call)
            and getattr(call.func.value.func, "id", None) == "super"
            and all(isinstance(a, plain) for a in call.args)
            and all(isinstance(k.value, plain) for k in call.keywords)
        ):
            continue
        return False
    return True


def _digest(fn: Any) -> str | None:
    """None for argument-storing code; else the source digest, ``generated`` or ``native``."""
    if not isinstance(fn, types.FunctionType):
        return "native"
    try:
        source = inspect.getsource(fn)
    except OSError:
        return "generated"  # NOTE: dataclass and namedtuple methods are built by exec()
    if _stores_arguments_only(fn):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def constructor_findings() -> dict[str, str]:
    """Each admitted class's unreviewed construction code: ``owner.method`` -> its digest."""
    findings: dict[str, str] = {}
    audited = _audited()
    for dotted in sorted(admitted_globals()):
        obj = _resolve(dotted)
        if not isinstance(obj, type):
            continue
        for method in METHODS:
            owner = next((k for k in inspect.getmro(obj) if method in k.__dict__), None)
            if owner is None or owner.__module__ == "builtins":
                continue
            key = f"{owner.__module__}.{owner.__qualname__}.{method}"
            raw = owner.__dict__[method]
            fn = raw.__func__ if isinstance(raw, staticmethod | classmethod) else raw
            digest = _digest(fn)
            if digest is None:
                continue
            if audited.get(key) != digest:
                findings[key] = digest
    return findings


def test_every_admitted_constructor_and_state_setter_is_audited() -> None:
    """An admitted class whose construction or state code is not on the audited list fails here."""
    findings = constructor_findings()
    assert not findings, "review these and add them to pickle_audit.txt:\n" + "\n".join(
        f"{k} {v}" for k, v in sorted(findings.items())
    )


def test_audit_list_has_no_stale_entries() -> None:
    """Every audited entry still belongs to an admitted class, so the list cannot rot silently."""
    live: set[str] = set()
    for dotted in admitted_globals():
        obj = _resolve(dotted)
        if isinstance(obj, type):
            for k in inspect.getmro(obj):
                live.update(f"{k.__module__}.{k.__qualname__}.{m}" for m in METHODS if m in k.__dict__)
    assert sorted(set(_audited()) - live) == []


def test_allowlist_is_exact_names_never_packages() -> None:
    """Every line names one importable object; nothing ends in a package or a wildcard."""
    names = admitted_globals() - STANDARD_GLOBALS
    assert names, f"{ALLOWLIST_FILE} is empty"
    for dotted in names:
        assert "*" not in dotted
        obj = _resolve(dotted)
        assert not isinstance(obj, types.ModuleType), f"{dotted} is a module"


@pytest.mark.parametrize(
    "dotted",
    [
        "scipy.stats._continuous_distns.norm_gen",  # __setstate__ evaluates code built from its state
        "numpy.vectorize",  # calls whatever it wraps
        "scipy.sparse.linalg.LinearOperator",  # calls its matvec
        "numpy.lib._datasource.DataSource",  # opens paths and URLs
        "sklearn.utils.parallel.Parallel",  # runs callables in workers
        "numpy.poly1d",
        "sklearn.frozen.FrozenEstimator",
    ],
)
def test_classes_of_admitted_packages_that_no_model_needs_are_refused(dotted: str) -> None:
    """Classes from numpy, scipy and sklearn that real model pickles never name are refused by name."""
    module, _, name = dotted.rpartition(".")
    stream = pickle.PROTO + b"\x04" + b"c" + module.encode() + b"\n" + name.encode() + b"\n."
    with pytest.raises(UntrustedArtifact, match="not in the allowlist"):
        loads(stream)


# -- every estimator family still loads ----------------------------------------------------
SKOPS_UNSUPPORTED = {"Birch"}
"""skops 0.16 cannot save these at all ("Objects of type Birch are not supported yet")."""


@pytest.fixture(scope="module")
def fitted() -> list[tuple[str, Any]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_pickle_allowlist as gen
    finally:
        sys.path.pop(0)
    from sklearn.utils import all_estimators

    warnings.filterwarnings("ignore")
    data = gen._data(np.random.default_rng(0))
    out = []
    for name, cls in all_estimators():
        for est in gen._instances(cls):
            gen._fit(est, data)
            out.append((name, est))
    return out


def test_a_fitted_model_of_every_estimator_loads_through_the_allowlist(
    fitted: list[tuple[str, Any]], tmp_path: Path
) -> None:
    """Every all_estimators() family, fitted on small data, round-trips as joblib, pickle and skops."""
    import skops.io as skops_io

    failures = []
    for name, est in fitted:
        path = tmp_path / f"{name}.joblib"
        joblib.dump(est, path, compress=3)
        try:
            loaded = load_joblib(path)
            guard.check_loaded(loaded, admitted_globals().__contains__, path.name)
            loads(pickle.dumps(est))
            if name not in SKOPS_UNSUPPORTED:
                skops_path = tmp_path / f"{name}.skops"
                skops_io.dump(est, skops_path)
                from_skops = load_skops(skops_path, LoadPolicy())
                guard.check_loaded(from_skops, admitted_globals().__contains__, skops_path.name)
        except Exception as exc:  # NOTE: collect every failure for the report
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        assert type(loaded) is type(est)
    print(f"\n{len(fitted)} fitted estimators loaded through the allowlist; failures: {failures}")
    assert failures == []


def test_the_fitted_estimators_predict_the_same_after_loading(
    fitted: list[tuple[str, Any]], tmp_path: Path
) -> None:
    """Loaded models are the same models: predict() agrees on the fitting data where they have one."""
    x = np.abs(np.random.default_rng(0).normal(size=(60, 4))) + 0.1
    compared = 0
    for name, est in fitted:
        if not callable(getattr(est, "predict", None)):
            continue
        try:
            expected = est.predict(x)
        except Exception:  # noqa: S112 -- NOTE: fitted on another data shape (text, dicts, kernels)
            continue
        if not np.array_equal(est.predict(x), expected):
            continue  # NOTE: random at predict time (DummyClassifier(strategy="stratified"))
        path = tmp_path / f"{compared}.joblib"
        joblib.dump(est, path)
        np.testing.assert_array_equal(load_joblib(path).predict(x), expected, err_msg=name)
        compared += 1
    assert compared > 100
