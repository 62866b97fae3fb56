"""Regenerate ``serving/formats/pickle_allowlist.txt`` from real pickles of fitted models.

The restricted unpickler admits globals by exact name. This script finds the
names real models need: it fits every estimator ``sklearn.utils.all_estimators()``
lists on small data (with sklearn's own test instances for the ones that need
arguments), saves each with ``pickle``, ``joblib`` and ``skops``, and records every
global the streams reference and every type the skops schemas name. It adds numpy dtype, scalar, RNG and array
reconstruction, and every scipy.sparse matrix and array class.

Run it after upgrading scikit-learn, numpy or scipy, review the diff like code,
then run ``pytest tests/unit/test_pickle_allowlist.py``, which audits every
admitted class's constructors and state setters::

    .venv/bin/python scripts/gen_pickle_allowlist.py            # rewrite the list
    .venv/bin/python scripts/gen_pickle_allowlist.py --check    # exit 1 if it would change

Estimators that do not fit on the small data are still admitted when their
unfitted pickle loads; the ones that cannot be built at all are printed.
"""

from __future__ import annotations

import argparse
import io
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import scipy.sparse
import sklearn
from joblib import numpy_pickle
from sklearn.utils import all_estimators

OUT = Path(__file__).resolve().parent.parent / "serving" / "formats" / "pickle_allowlist.txt"

EXCLUDED: dict[str, str] = {
    # NOTE: reviewed exclusions.
    "sklearn.frozen._frozen.FrozenEstimator": "delegates every attribute to an arbitrary wrapped object",
}
"""Classes the generator may find but the allowlist leaves out, with the reason.

Classes whose *parameters* can name callables or files (FunctionTransformer's
``func``, a vectorizer's ``input="filename"``) stay admitted: serving.formats.guard
checks those values on every loaded model."""


def _data(rng: np.random.Generator) -> dict[str, Any]:
    x = np.abs(rng.normal(size=(60, 4))) + 0.1
    return {
        "X": x,
        "y_class": np.repeat([0, 1, 2], 20),
        "y_bin": np.repeat([0, 1], 30),
        "y_reg": x @ np.array([1.0, 2.0, 0.5, 0.1]) + 0.5,
        "Y_multi": np.stack([np.repeat([0, 1], 30), np.tile([0, 1], 30)], axis=1),
        "K": x @ x.T,
        "X_missing": np.where(x > 1.0, np.nan, x),
        "text": [f"word{i % 7} token{i % 3} model serving" for i in range(60)],
        "dicts": [{"a": float(i), "b": float(i % 3)} for i in range(60)],
    }


def _fit(est: Any, d: dict[str, Any]) -> str | None:
    """Fit ``est`` on the first data shape it accepts; None, or why none worked."""
    from sklearn.base import is_classifier, is_regressor

    tags = est.__sklearn_tags__()
    if tags.input_tags.string:
        xs = [d["text"]]
    elif tags.input_tags.dict:
        xs = [d["dicts"]]
    else:
        xs = [d["X"], d["K"], d["X_missing"], d["X"][:, 0], d["text"], d["dicts"]]
    if is_classifier(est):
        ys = [d["y_class"], d["y_bin"], d["Y_multi"]]
    elif is_regressor(est):
        ys = [d["y_reg"], d["Y_multi"]]
    else:
        ys = [None, d["y_class"], d["Y_multi"]]
    last = "no data shape fits"
    for x in xs:
        for y in ys:
            try:
                est.fit(x) if y is None else est.fit(x, y)
                return None
            except Exception as exc:  # noqa: BLE001 -- NOTE: try the next data shape
                last = f"{type(exc).__name__}: {exc}"[:160]
    return last


class _Recorder(pickle.Unpickler):
    found: set[str]

    def find_class(self, module: str, name: str) -> Any:
        self.found.add(f"{module}.{name}")
        return super().find_class(module, name)


def _record_pickle(obj: Any, found: set[str]) -> None:
    r = _Recorder(io.BytesIO(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
    r.found = found
    r.load()


def _record_joblib(obj: Any, found: set[str]) -> None:
    base = numpy_pickle.NumpyUnpickler.find_class

    def recording(self: Any, module: str, name: str) -> Any:
        found.add(f"{module}.{name}")
        return base(self, module, name)

    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    numpy_pickle.NumpyUnpickler.find_class = recording  # type: ignore[method-assign]
    try:
        joblib.load(buf)
    finally:
        numpy_pickle.NumpyUnpickler.find_class = base  # type: ignore[method-assign]


def _schema_names(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("__class__"), str) and isinstance(node.get("__module__"), str):
            found.add(f"{node['__module__']}.{node['__class__']}")
        for v in node.values():
            _schema_names(v, found)
    elif isinstance(node, list):
        for v in node:
            _schema_names(v, found)


def _record_skops(obj: Any, found: set[str]) -> None:
    """The types a skops file of ``obj`` names (serving.formats.skops_io checks them the same way)."""
    import json
    import zipfile

    import skops.io as sio

    with zipfile.ZipFile(io.BytesIO(sio.dumps(obj))) as z:
        _schema_names(json.loads(z.read("schema.json")), found)


def _instances(cls: type) -> list[Any]:
    from sklearn.utils._test_common.instance_generator import _construct_instances

    try:
        return list(_construct_instances(cls))
    except Exception:  # noqa: BLE001 -- NOTE: fall back to the default constructor
        try:
            return [cls()]
        except TypeError:
            return []


def _extras() -> list[Any]:
    """Objects real model pickles hold besides estimators."""
    out: list[Any] = []
    for dt in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?", "c8", "c16", "O", "U8"):
        out.append(np.zeros(3, dtype=dt))
        out.append(np.dtype(dt))
        if dt not in ("O", "U8"):
            out.append(np.zeros(1, dtype=dt)[0])
    out.append(np.zeros((2, 2), dtype=[("a", "f8"), ("b", "i4")]))
    out.append(np.array(["a", None], dtype=object))
    out += [np.random.RandomState(0), np.random.default_rng(0)]
    out += [getattr(np.random, g)(0) for g in ("MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64")]
    dense = np.eye(3)
    for fmt in ("csr", "csc", "coo", "bsr", "dia", "dok", "lil"):
        out.append(getattr(scipy.sparse, f"{fmt}_matrix")(dense))
        out.append(getattr(scipy.sparse, f"{fmt}_array")(dense))
    out += [np.float64, np.int64, np.float32, np.bool_, np.int32]
    return out


def generate() -> tuple[list[str], list[str]]:
    """(sorted admitted names, problems to report)."""
    warnings.filterwarnings("ignore")
    d = _data(np.random.default_rng(0))
    found: set[str] = set()
    problems: list[str] = []
    objs: list[Any] = list(_extras())
    for name, cls in all_estimators():
        instances = _instances(cls)
        if not instances:
            problems.append(f"{name}: cannot be built without arguments; not recorded")
        for est in instances:
            why = _fit(est, d)
            if why is not None:
                problems.append(f"{name}: not fitted ({why}); its unfitted pickle is recorded")
            objs.append(est)
    for obj in objs:
        for record in (_record_pickle, _record_joblib, _record_skops):
            try:
                record(obj, found)
            except Exception as exc:  # noqa: BLE001 -- NOTE: report, keep going
                problems.append(f"{type(obj).__name__}: {record.__name__}: {exc}")
    admitted = sorted(n for n in found if n not in EXCLUDED)
    return admitted, problems


def render(admitted: list[str]) -> str:
    head = [
        "# Exact globals the restricted unpickler admits (serving/formats/unpickler.py).",
        f"# Generated by scripts/gen_pickle_allowlist.py from scikit-learn {sklearn.__version__}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}, joblib {joblib.__version__}.",
        "# Do not edit by hand: regenerate, review the diff, run tests/unit/test_pickle_allowlist.py.",
        "# Excluded on review: " + ", ".join(sorted(EXCLUDED)),
    ]
    return "\n".join([*head, *admitted]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed list would change")
    args = parser.parse_args(argv)
    admitted, problems = generate()
    for p in problems:
        print(p, file=sys.stderr)
    text = render(admitted)
    old = OUT.read_text() if OUT.exists() else ""
    strip = [ln for ln in old.splitlines() if not ln.startswith("#")]
    if args.check:
        changed = strip != admitted
        print("the allowlist would change" if changed else "the allowlist is current")
        return 1 if changed else 0
    OUT.write_text(text)
    print(f"wrote {len(admitted)} names to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
