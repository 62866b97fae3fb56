"""The restricted unpickler: real model pickles load, gadgets are refused before they run.

Each malicious payload would create a sentinel file if any of it executed; the
file's absence proves the refusal happened at load time, before the call.
"""

from __future__ import annotations

import os
import pickle
import pty
import re
import runpy
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from serving.errors import UntrustedArtifact
from serving.formats.unpickler import load_joblib, load_pickle

Iris = tuple[np.ndarray, np.ndarray]


class Reduce:
    """Pickles as ``func(*args)``: what an attacker's payload looks like."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def touch(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def gadgets(sentinel: Path, tmp: Path) -> dict[str, Any]:
    script = tmp / "evil.py"
    script.write_text(touch(sentinel))
    s = str(sentinel)
    inner = tmp / "inner.pkl"  # joblib.load would unpickle it unrestricted
    inner.write_bytes(pickle.dumps(Reduce(os.system, f"touch {s}")))
    return {
        "os.system": Reduce(os.system, f"touch {s}"),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", s]),
        "builtins.eval": Reduce(eval, touch(sentinel)),
        "builtins.exec": Reduce(exec, touch(sentinel)),
        "runpy.run_path": Reduce(runpy.run_path, str(script)),
        "timeit.timeit": Reduce(timeit.timeit, touch(sentinel), "pass", time.perf_counter, 1),
        "pty.spawn": Reduce(pty.spawn, ["touch", s]),
        "importlib.import_module": Reduce(__import__("importlib").import_module, "antigravity"),
        "numpy.memmap": Reduce(np.memmap, s, np.uint8, "w+", 0, (1,)),
        "joblib.load": Reduce(joblib.load, str(inner)),
        # nested: an innocent-looking estimator carrying a payload in an attribute
        "nested": _estimator_with(Reduce(os.system, f"touch {s}")),
    }


def _estimator_with(payload: Any) -> Any:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression()
    model.coef_ = payload
    return model


GADGET_NAMES = [
    "os.system",
    "subprocess.Popen",
    "builtins.eval",
    "builtins.exec",
    "runpy.run_path",
    "timeit.timeit",
    "pty.spawn",
    "importlib.import_module",
    "numpy.memmap",
    "joblib.load",
    "nested",
]


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


@pytest.mark.parametrize("gadget", GADGET_NAMES)
def test_malicious_pickle_is_refused_before_running(gadget: str, sentinel: Path, tmp_path: Path) -> None:
    """A plain pickle calling a dangerous global raises UntrustedArtifact and runs nothing."""
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(gadgets(sentinel, tmp_path)[gadget]))
    with pytest.raises(UntrustedArtifact, match=r"refused to load global .* from model\.pkl"):
        load_pickle(path)
    assert not sentinel.exists()


@pytest.mark.parametrize("compress", [0, 3])
@pytest.mark.parametrize("gadget", GADGET_NAMES)
def test_malicious_joblib_is_refused_before_running(
    gadget: str, compress: int, sentinel: Path, tmp_path: Path
) -> None:
    """A joblib file (plain or compressed) calling a dangerous global is refused and runs nothing."""
    path = tmp_path / "model.joblib"
    joblib.dump(gadgets(sentinel, tmp_path)[gadget], path, compress=compress)
    with pytest.raises(UntrustedArtifact, match="refused to load global"):
        load_joblib(path)
    assert not sentinel.exists()


def test_payload_inside_joblib_object_array_is_refused(sentinel: Path, tmp_path: Path) -> None:
    """Object-dtype arrays are a nested pickle stream in joblib files: it is checked too."""
    path = tmp_path / "model.joblib"
    array = np.empty(1, dtype=object)
    array[0] = Reduce(os.system, f"touch {sentinel}")
    joblib.dump({"weights": array}, path)
    with pytest.raises(UntrustedArtifact, match=r"'(posix|os)\.system'"):
        load_joblib(path)
    assert not sentinel.exists()


def test_refusal_names_the_global_and_the_setting(tmp_path: Path) -> None:
    """The message says which global, from which file, and how an operator could admit it."""
    path = tmp_path / "model.joblib"
    joblib.dump(Reduce(subprocess.Popen, ["true"]), path)
    with pytest.raises(UntrustedArtifact) as info:
        load_joblib(path)
    assert str(info.value) == (
        "refused to load global 'subprocess.Popen' from model.joblib: not in the allowlist "
        "(add it to SERVING_TRUSTED_GLOBALS only if you trust it)"
    )


def test_getattr_chain_is_refused(sentinel: Path, tmp_path: Path) -> None:
    """getattr(__import__('os'), 'system')(...) written by hand is refused at builtins.getattr."""
    path = tmp_path / "model.pkl"
    path.write_bytes(
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch "
        + str(sentinel).encode()
        + b"\ntR."
    )
    with pytest.raises(UntrustedArtifact, match=re.escape("'builtins.getattr'")):
        load_pickle(path)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("numpy", "ndarray.__class__"),  # attribute walk from an admitted class to `type`
        ("sklearn.pipeline", "Pipeline.__init__.__globals__"),
        ("numpy", "load"),  # a function in an admitted package is not a class
        ("numpy.testing._private.utils", "runstring"),  # exec()s its argument
        ("sklearn.callback._progressbar", "Thread"),  # threading.Thread re-exported
        ("sklearn.utils.discovery", "Path"),  # pathlib.Path re-exported
    ],
)
def test_names_inside_admitted_packages_that_are_not_their_classes_are_refused(
    module: str, name: str, tmp_path: Path
) -> None:
    """Only classes defined in the scientific stack pass; attribute walks and re-exports do not."""
    m, n = module.encode(), name.encode()
    stream = b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93."
    path = tmp_path / "model.pkl"
    path.write_bytes(stream)
    with pytest.raises(UntrustedArtifact, match=re.escape(f"'{module}.{name}'")):
        load_pickle(path)


def test_module_is_not_imported_before_it_is_admitted(tmp_path: Path) -> None:
    """A module whose import runs code (numpy.f2py.__main__) is refused without importing it."""
    sys.modules.pop("numpy.f2py.__main__", None)
    path = tmp_path / "model.pkl"
    path.write_bytes(b"cnumpy.f2py.__main__\nmain\n.")
    with pytest.raises(UntrustedArtifact):
        load_pickle(path)
    assert "numpy.f2py.__main__" not in sys.modules


# -- real models load --------------------------------------------------------------


@pytest.fixture(scope="module")
def iris() -> Iris:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x, y


def _pipeline() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=200))])


def _forest() -> Any:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=5, random_state=0)


@pytest.mark.parametrize("compress", [0, 3])
@pytest.mark.parametrize("make", [_pipeline, _forest], ids=["pipeline", "random-forest"])
def test_real_sklearn_joblib_files_load(
    make: Callable[[], Any], compress: int, iris: Iris, tmp_path: Path
) -> None:
    """A StandardScaler+LogisticRegression Pipeline and a RandomForest load through the allowlist."""
    x, y = iris
    model = make().fit(x, y)
    path = tmp_path / "model.joblib"
    joblib.dump(model, path, compress=compress)
    loaded = load_joblib(path)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    np.testing.assert_allclose(loaded.predict_proba(x), model.predict_proba(x))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_real_sklearn_pickle_loads(protocol: int, iris: Iris, tmp_path: Path) -> None:
    """A pickled Pipeline loads with old and new pickle protocols."""
    x, y = iris
    model = _pipeline().fit(x, y)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model, protocol=protocol))
    np.testing.assert_array_equal(load_pickle(path).predict(x), model.predict(x))


def test_joblib_object_arrays_of_plain_data_load(tmp_path: Path) -> None:
    """Object-dtype arrays holding plain data (strings, dicts) load."""
    path = tmp_path / "labels.joblib"
    array = np.array(["setosa", {"k": 1}, 3], dtype=object)
    joblib.dump(array, path)
    assert load_joblib(path).tolist() == ["setosa", {"k": 1}, 3]


def test_trusted_global_from_the_policy_is_admitted(iris: Iris, tmp_path: Path) -> None:
    """FunctionTransformer(np.log1p) is refused by default and loads once numpy.log1p is trusted."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, y = iris
    model = make_pipeline(FunctionTransformer(np.log1p), LogisticRegression(max_iter=300)).fit(x, y)
    path = tmp_path / "model.joblib"
    joblib.dump(model, path)
    with pytest.raises(UntrustedArtifact, match=re.escape("'numpy.log1p'")):
        load_joblib(path)
    loaded = load_joblib(path, trusted_globals={"numpy.log1p"})
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
