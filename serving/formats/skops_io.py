"""``skops``: scikit-learn estimators saved with ``skops.io.dump``.

A skops file is a zip of a JSON schema and ``.npy`` arrays; loading builds
objects from the schema instead of unpickling. skops's own default trusted
types are wider than a model needs (every numpy ufunc, any sklearn type), so
they are not used: every type and function the schema names must be on the
same exact allowlist as pickles (:func:`serving.formats.unpickler.admitted_globals`)
or in ``LoadPolicy.trusted_globals`` (``SERVING_TRUSTED_GLOBALS``), or the file
is refused before anything is constructed. ``trusted=True`` is never used. The
built model then passes :mod:`serving.formats.guard` like a pickled one (no
``input="filename"`` vectorizers, no callables the policy does not admit).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from serving.errors import LoadError, UntrustedArtifact
from serving.manifest import Manifest

from . import unpickler
from ._common import check_zip_expansion, primary_file, require
from .base import Format, LoadPolicy, Predictor
from .pickled import checked_estimator
from .table import FORMAT_FACTS

_SCHEMA = "schema.json"


_KEY_TYPES = frozenset(
    {"builtins.str", "builtins.int", "builtins.float", "builtins.bool", "builtins.NoneType"}
)
"""What a DictNode may convert its JSON keys with (skops calls each ``key_types`` entry on a key)."""


def schema_types(schema: Any) -> set[str]:
    """Every name a skops schema asks to build, call or look up.

    A node's ``module.class``, and for a ``MethodNode`` (skops's attribute
    lookup) the attribute too: ``numpy.ndarray.tofile`` is not ``numpy.ndarray``.
    A ``DictNode``'s ``key_types`` entries are called on its keys, so anything
    but a plain key type there is reported as ``<key_types>:name``.
    """
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        cls, module = node.get("__class__"), node.get("__module__")
        if isinstance(cls, str) and isinstance(module, str):
            name = f"{module}.{cls}"
            found.add(name)
            loader = node.get("__loader__")
            content = node.get("content")
            if loader == "MethodNode":
                attr = content.get("func") if isinstance(content, dict) else None
                found.add(f"{name}.{attr}")
            if loader == "DictNode":
                found.update(_key_type_names(node.get("key_types")))
        stack.extend(node.values())
    return found


def _key_type_names(key_types: Any) -> set[str]:
    items = key_types.get("content") if isinstance(key_types, dict) else None
    out = set()
    for item in items if isinstance(items, list) else [key_types]:
        ok = isinstance(item, dict) and item.get("__loader__") == "TypeNode"
        name = f"{item.get('__module__')}.{item.get('__class__')}" if isinstance(item, dict) else repr(item)
        if not ok or name not in _KEY_TYPES:
            out.add(f"<key_types>:{name}")
    return out


class SkopsFormat(Format, facts=FORMAT_FACTS["skops"]):
    """An estimator saved with ``skops.io.dump``; outputs as for ``sklearn``."""

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix.lower() in self.suffixes:
            return True
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return _SCHEMA in z.namelist()

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        path = primary_file(root, manifest, self.suffixes)
        return checked_estimator(load_skops(path, policy), path, manifest, policy)


def load_skops(path: Path, policy: LoadPolicy) -> Any:
    """``skops.io.load`` with every name checked by the exact allowlist first.

    Raises:
        UntrustedArtifact: the schema names a type, function, attribute lookup or
            key type that is not admitted, or its members would expand past the
            policy's limit.
        MissingExtra: skops is not installed.
        LoadError: the file is not a readable skops archive.
    """
    sio = require("skops.io", "skops", "skops")
    skops_errors = require("skops.io.exceptions", "skops", "skops")
    # NOTE: declared member sizes first: schema.json is inflated whole to be parsed.
    check_zip_expansion(path, policy.expansion_limit(path.stat().st_size))
    gate = unpickler.GlobalPolicy(policy.trusted_globals, path.name)
    # NOTE: skops's own audit sees names our walk might not (its node types can change
    # between releases): both lists must pass the same exact gate.
    reported = sorted(sio.get_untrusted_types(file=path))
    named = schema_types(_read_schema(path)) | set(reported)
    refused = sorted(t for t in named if not gate.admits(t))
    if refused:
        raise UntrustedArtifact(
            f"{path.name} names types that are not on the allowlist: {refused}; "
            "add them to SERVING_TRUSTED_GLOBALS only if you trust them like code"
        )
    try:
        return sio.load(path, trusted=reported)
    except skops_errors.UntrustedTypesFoundException as exc:
        raise UntrustedArtifact(f"{path.name}: {exc}") from exc


def _read_schema(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(_SCHEMA))
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise LoadError(f"{path.name} has no readable {_SCHEMA}: {exc}") from exc
