"""A restricted unpickler for sklearn/joblib and plain pickle artifacts.

Unpickling calls whatever callables the stream names, so the check runs at load
time inside ``find_class`` (every global the stream references goes through it,
nested joblib object arrays included), not as a scan beforehand. A global is
admitted when it is:

1. on :data:`ALLOWED_FUNCTIONS`, an explicit list of the callables real
   sklearn/joblib/numpy pickles reference (array reconstruction, dtype, RNG
   state, Cython ``__pyx_unpickle_*`` helpers of admitted classes);
2. a *class* (``isinstance(obj, type)``) defined in the scientific stack
   (:data:`CLASS_PACKAGES`), outside the sub-packages in :data:`DENIED_MODULES`
   and not on :data:`DENIED_CLASSES`; or
3. listed in ``LoadPolicy.trusted_globals`` by the operator.

Modules are never admitted wholesale: numpy, sklearn and joblib all contain
functions that evaluate strings or run programs, so functions need the list.
A module is imported only after its name passed the gate, because importing
can itself run code (``numpy.f2py.__main__``).
"""

from __future__ import annotations

import _compat_pickle
import importlib
import inspect
import io
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from serving.errors import LoadError, UntrustedArtifact

__all__ = [
    "ALLOWED_FUNCTIONS",
    "CLASS_PACKAGES",
    "DENIED_CLASSES",
    "DENIED_MODULES",
    "GlobalPolicy",
    "load_joblib",
    "load_pickle",
    "loads",
]

ALLOWED_FUNCTIONS: frozenset[str] = frozenset(
    {
        # numpy array and scalar reconstruction (numpy 2 and numpy 1 module names)
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "numpy._core.numeric._frombuffer",
        "numpy.core.numeric._frombuffer",
        # numpy random state (RandomState/Generator/BitGenerator by registered name)
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        # sklearn's Cython extension types: ``cls.__new__(cls)``
        "sklearn.metrics._dist_metrics.newObj",
        "sklearn.neighbors._kd_tree.newObj",
        "sklearn.neighbors._ball_tree.newObj",
        # the standard library's own pickle helpers
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "_codecs.encode",
    }
)
"""Functions (not classes) a model pickle may call, by ``module.qualname``."""

ALLOWED_BUILTIN_CLASSES: frozenset[str] = frozenset(
    {
        "builtins.object",
        "builtins.bool",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bytes",
        "builtins.list",
        "builtins.tuple",
        "builtins.dict",
        "builtins.slice",
        "builtins.complex",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "builtins.range",
        "collections.OrderedDict",
        "collections.defaultdict",
        "datetime.date",
        "datetime.datetime",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        "joblib.numpy_pickle.NumpyArrayWrapper",
    }
)
"""Plain data classes from the standard library, and joblib's array placeholder."""

CLASS_PACKAGES: tuple[str, ...] = ("sklearn", "numpy", "scipy")
"""Top-level packages whose classes (only classes) are admitted."""

DENIED_MODULES: tuple[str, ...] = (
    "numpy.f2py",
    "numpy.distutils",
    "numpy.testing",
    "numpy.ctypeslib",
    "numpy.lib._datasource",
    "numpy.lib.npyio",
    "numpy.lib._npyio_impl",
    "numpy.lib.format",
    "numpy._pytesttester",
    "numpy.conftest",
    "scipy._lib._testutils",
    "scipy.io",
    "scipy.datasets",
    "scipy.misc",
    "sklearn.utils._testing",
    "sklearn.externals",
    "sklearn.datasets",
)
"""Sub-packages of :data:`CLASS_PACKAGES` whose classes touch files, the network or tests."""

DENIED_CLASSES: frozenset[str] = frozenset(
    {
        "numpy.memmap",  # opens, creates or truncates a file in __new__
    }
)


def _qualified(obj: type) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _module_denied(module: str) -> bool:
    parts = module.split(".")
    if any(p == "__main__" or p.startswith("test") or p == "conftest" for p in parts):
        return True
    return any(module == d or module.startswith(d + ".") for d in DENIED_MODULES)


def _in_class_packages(module: str) -> bool:
    return module.split(".", 1)[0] in CLASS_PACKAGES and not _module_denied(module)


class GlobalPolicy:
    """Decides which globals a pickle stream may reference; resolves admitted ones."""

    def __init__(self, trusted_globals: Iterable[str] = (), source: str = "the artifact") -> None:
        self.trusted = frozenset(trusted_globals)
        self.source = source

    def refuse(self, dotted: str, why: str = "not in the allowlist") -> UntrustedArtifact:
        return UntrustedArtifact(
            f"refused to load global {dotted!r} from {self.source}: {why} "
            f"(add it to SERVING_TRUSTED_GLOBALS only if you trust it)"
        )

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` if the policy admits it, else raise UntrustedArtifact."""
        # NOTE: map Python 2 names first (as pickle does for protocols < 3), so the
        # check sees the object that would actually be loaded. The C unpickler does
        # not expose the protocol; the mapping's keys are not Python 3 modules.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        dotted = f"{module}.{name}"
        if dotted in self.trusted:
            return _resolve(module, name, dotted, self)
        if dotted in ALLOWED_FUNCTIONS or dotted in ALLOWED_BUILTIN_CLASSES:
            return _resolve(module, name, dotted, self)
        pyx = _pyx_helper_class(name)
        if pyx is not None and _in_class_packages(module):
            # NOTE: Cython's ``__pyx_unpickle_<Cls>`` only rebuilds ``<Cls>`` of the
            # same module: admit it exactly when that class is admitted.
            self._admitted_class(module, pyx, f"{module}.{pyx}")
            return _resolve(module, name, dotted, self)
        if "__" in name or "<" in name:
            raise self.refuse(dotted)
        return self._admitted_class(module, name, dotted)

    def _admitted_class(self, module: str, name: str, dotted: str) -> type:
        if not _in_class_packages(module):
            raise self.refuse(dotted)
        obj = _resolve(module, name, dotted, self)
        if not isinstance(obj, type):
            raise self.refuse(dotted, "only classes are admitted from this package, and this is not one")
        # NOTE: ``sklearn.x.Popen`` would resolve to subprocess.Popen if sklearn.x
        # imported it: judge the class by where it is defined, not where it was found.
        defined_in = getattr(obj, "__module__", "") or ""
        if not _in_class_packages(defined_in):
            raise self.refuse(dotted, f"it is {_qualified(obj)!r}, defined outside the admitted packages")
        if any(_qualified(k) in DENIED_CLASSES for k in inspect.getmro(obj)):
            raise self.refuse(dotted, "this class opens files when constructed")
        return obj


def _pyx_helper_class(name: str) -> str | None:
    prefix = "__pyx_unpickle_"
    if name.startswith(prefix) and name[len(prefix) :].isidentifier() and "__" not in name[len(prefix) :]:
        return name[len(prefix) :]
    return None


def _resolve(module: str, name: str, dotted: str, policy: GlobalPolicy) -> Any:
    try:
        mod = importlib.import_module(module)
        obj: Any = mod
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise LoadError(f"{policy.source} references {dotted!r}, which cannot be imported: {exc}") from exc
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], policy: GlobalPolicy) -> None:
        super().__init__(file)
        self._policy = policy

    def find_class(self, module: str, name: str) -> Any:
        return self._policy.find_class(module, name)


class _RestrictedPurePickle(pickle._Unpickler):  # type: ignore[name-defined,misc]  # NOTE: joblib's base
    def __init__(self, file: IO[bytes], policy: GlobalPolicy) -> None:
        super().__init__(file)
        self._policy = policy

    def find_class(self, module: str, name: str) -> Any:
        return self._policy.find_class(module, name)


def load_pickle(path: Path, trusted_globals: Iterable[str] = ()) -> Any:
    """Unpickle ``path`` through the allowlist.

    Raises:
        UntrustedArtifact: the stream references a global the policy does not admit.
        LoadError: the stream is not a valid pickle.
    """
    policy = GlobalPolicy(trusted_globals, path.name)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, policy).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise LoadError(f"{path.name} is not a valid pickle: {exc}") from exc


def _joblib_unpickler_class() -> type:
    """joblib's NumpyUnpickler with our find_class, built on first use (lazy import)."""
    from joblib import numpy_pickle

    base: Any = numpy_pickle.NumpyUnpickler

    class RestrictedNumpyUnpickler(base):  # type: ignore[misc,valid-type]  # NOTE: untyped joblib base
        _policy: GlobalPolicy

        def find_class(self, module: str, name: str) -> Any:
            return self._policy.find_class(module, name)

        def load_build(self) -> None:
            # NOTE: object-dtype arrays are a nested pickle stream inside the joblib
            # file. Read it here with our own unpickler rather than trusting each
            # joblib version to route it through find_class.
            state, inst = self.stack[-1], self.stack[-2]
            if (
                isinstance(inst, numpy_pickle.NumpyArrayWrapper)
                and isinstance(state, dict)
                and getattr(state.get("dtype"), "hasobject", False)
            ):
                pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
                wrapper = self.stack.pop()
                nested = _RestrictedPurePickle(self.file_handle, self._policy).load()
                if getattr(nested, "dtype", None) is None or nested.shape != tuple(wrapper.shape):
                    raise LoadError(f"{self._policy.source}: malformed object array")
                self.stack.append(nested)
                return
            base.load_build(self)

        dispatch = base.dispatch.copy()
        dispatch[pickle.BUILD[0]] = load_build

    return RestrictedNumpyUnpickler


def load_joblib(path: Path, trusted_globals: Iterable[str] = ()) -> Any:
    """``joblib.load`` with every global checked by the allowlist (no memory mapping).

    Raises:
        UntrustedArtifact: the stream references a global the policy does not admit,
            or the file is in joblib's pre-0.10 multi-file format.
        LoadError: the file is not a valid joblib pickle.
    """
    from joblib import numpy_pickle_utils

    policy = GlobalPolicy(trusted_globals, path.name)
    unpickler_cls = _joblib_unpickler_class()
    # NOTE: joblib renamed this helper in 1.5; both take (fileobj, filename, mmap_mode).
    open_fileobject = getattr(numpy_pickle_utils, "_validate_fileobject_and_memmap", None) or getattr(
        numpy_pickle_utils, "_read_fileobject", None
    )
    if open_fileobject is None:
        raise LoadError("this joblib version is not supported: install joblib>=1.4")
    takes_byte_order = "ensure_native_byte_order" in inspect.signature(unpickler_cls).parameters
    with open(path, "rb") as f, open_fileobject(f, str(path), None) as opened:
        fobj = opened[0] if isinstance(opened, tuple) else opened
        if isinstance(fobj, str):
            raise UntrustedArtifact(
                f"{path.name} uses joblib's pre-0.10 format, which reads companion files: "
                f"re-save it with a current joblib"
            )
        kwargs: dict[str, Any] = {"ensure_native_byte_order": True} if takes_byte_order else {}
        unpickler = unpickler_cls(str(path), fobj, **kwargs)
        unpickler._policy = policy
        try:
            return unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise LoadError(f"{path.name} is not a valid joblib file: {exc}") from exc


def loads(data: bytes, trusted_globals: Iterable[str] = ()) -> Any:
    """Unpickle bytes through the allowlist (used by tests and small payloads)."""
    return _RestrictedUnpickler(io.BytesIO(data), GlobalPolicy(trusted_globals, "<bytes>")).load()
