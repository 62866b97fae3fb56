"""A restricted unpickler for sklearn/joblib and plain pickle artifacts.

Unpickling calls whatever callables the stream names, so the check runs at load
time inside ``find_class`` (every global the stream references goes through it,
nested joblib object arrays included), not as a scan beforehand. A global is
admitted only by its exact ``module.qualname``, when it is:

1. on the generated list ``pickle_allowlist.txt`` beside this module: every
   global that pickles of fitted scikit-learn estimators, numpy arrays, dtypes
   and RNG state, and scipy.sparse matrices reference
   (``scripts/gen_pickle_allowlist.py`` builds it; ``tests/unit/test_pickle_allowlist.py``
   audits the constructors and state setters of every class on it);
2. on :data:`STANDARD_GLOBALS`, a short reviewed list of plain standard-library
   data classes and pickle helpers (and numpy 1 spellings of numpy's helpers); or
3. listed in ``LoadPolicy.trusted_globals`` by the operator.

Nothing is admitted by package or module prefix: a class is a callable, and its
``__new__``, ``__init__`` and ``__setstate__`` run with arguments the stream
chooses, so every admitted class is one somebody reviewed. A module is imported
only after the name passed the gate, because importing can itself run code
(``numpy.f2py.__main__``).

What a loaded object *does* with its state at predict time is checked after
loading by :mod:`serving.formats.guard`.
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import inspect
import io
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from serving.errors import LoadError, UntrustedArtifact

__all__ = [
    "ALLOWLIST_FILE",
    "STANDARD_GLOBALS",
    "GlobalPolicy",
    "admitted_globals",
    "load_joblib",
    "load_pickle",
    "loads",
]

ALLOWLIST_FILE = Path(__file__).with_name("pickle_allowlist.txt")
"""The generated exact list (one ``module.qualname`` a line, ``#`` comments)."""

STANDARD_GLOBALS: frozenset[str] = frozenset(
    {
        # plain data classes of the standard library
        "builtins.object",
        "builtins.bool",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.list",
        "builtins.tuple",
        "builtins.dict",
        "builtins.slice",
        "builtins.complex",
        "builtins.set",
        "builtins.frozenset",
        "builtins.bytearray",
        "collections.OrderedDict",
        "collections.defaultdict",
        "datetime.date",
        "datetime.datetime",
        "datetime.time",
        "datetime.timedelta",
        "datetime.timezone",
        # the standard library's own pickle helpers: they only call admitted classes
        "copyreg._reconstructor",
        "copyreg.__newobj__",
        "_codecs.encode",
        # numpy 1 spellings of the array helpers the generated list names for numpy 2
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",
        # joblib's placeholder for arrays stored beside the pickle stream
        "joblib.numpy_pickle.NumpyArrayWrapper",
    }
)
"""Reviewed by hand: plain data and pickle helpers that no generated list would name."""


@functools.cache
def admitted_globals() -> frozenset[str]:
    """Every global admitted by default: the generated list plus :data:`STANDARD_GLOBALS`."""
    try:
        lines = ALLOWLIST_FILE.read_text().splitlines()
    except OSError as exc:
        raise LoadError(f"the pickle allowlist {ALLOWLIST_FILE} cannot be read: {exc}") from exc
    generated = {ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}
    return frozenset(generated) | STANDARD_GLOBALS


class GlobalPolicy:
    """Decides which globals a pickle stream may reference; resolves admitted ones."""

    def __init__(self, trusted_globals: Iterable[str] = (), source: str = "the artifact") -> None:
        self.trusted = frozenset(trusted_globals)
        self.source = source
        self._admitted = admitted_globals()

    def refuse(self, dotted: str, why: str = "not in the allowlist") -> UntrustedArtifact:
        return UntrustedArtifact(
            f"refused to load global {dotted!r} from {self.source}: {why} "
            f"(add it to SERVING_TRUSTED_GLOBALS only if you trust it)"
        )

    def admits(self, dotted: str) -> bool:
        return dotted in self._admitted or dotted in self.trusted

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
        if not self.admits(dotted):
            raise self.refuse(dotted)
        return _resolve(module, name, dotted, self)


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


class _RestrictedPurePickle(pickle._Unpickler):  # NOTE: joblib's base
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

    class RestrictedNumpyUnpickler(base):  # type: ignore[misc]  # NOTE: untyped joblib base
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


class _BoundedReader:
    """A decompressing file object that refuses to produce more than ``limit`` bytes.

    joblib's own compressors (zlib, gzip, bz2, lzma/xz, lz4) declare no
    uncompressed size, so the bound is the policy's expansion limit for the file.
    """

    def __init__(self, raw: Any, limit: int, label: str) -> None:
        self._raw, self._limit, self._label = raw, limit, label
        self.produced = 0

    def _count(self, n: int) -> None:
        self.produced += n
        if self.produced > self._limit:
            raise UntrustedArtifact(
                f"{self._label}: decompresses to more than {self._limit} bytes "
                "(refusing a decompression bomb; see SERVING_MAX_EXPANSION_RATIO)"
            )

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit - self.produced + 1
        data: bytes = self._raw.read(min(size, self._limit - self.produced + 1))
        self._count(len(data))
        return data

    def readline(self, size: int = -1) -> bytes:
        cap = self._limit - self.produced + 1
        data: bytes = self._raw.readline(cap if size is None or size < 0 else min(size, cap))
        self._count(len(data))
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(memoryview(buf)))
        memoryview(buf).cast("B")[: len(data)] = data
        return len(data)


def load_joblib(
    path: Path, trusted_globals: Iterable[str] = (), max_expanded_bytes: int | None = None
) -> Any:
    """``joblib.load`` with every global checked by the allowlist (no memory mapping).

    Args:
        path: the joblib file.
        trusted_globals: globals the operator admits beyond the allowlist.
        max_expanded_bytes: a compressed file may decompress to at most this many bytes.

    Raises:
        UntrustedArtifact: the stream references a global the policy does not admit,
            the file is in joblib's pre-0.10 multi-file format, or it decompresses
            past ``max_expanded_bytes``.
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
        if fobj is not f and max_expanded_bytes is not None:
            fobj = _BoundedReader(fobj, max_expanded_bytes, path.name)
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
