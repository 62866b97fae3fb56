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

_SUFFIXES = (".skops",)
_SCHEMA = "schema.json"


def schema_types(schema: Any) -> set[str]:
    """Every ``module.name`` a skops schema asks to build or reference."""
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            cls, module = node.get("__class__"), node.get("__module__")
            if isinstance(cls, str) and isinstance(module, str):
                found.add(f"{module}.{cls}")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


class SkopsFormat(Format):
    """An estimator saved with ``skops.io.dump``; outputs as for ``sklearn``."""

    name = "skops"
    framework = "scikit-learn"
    extra = "skops"

    def detect(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if path.suffix.lower() in _SUFFIXES:
            return True
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return _SCHEMA in z.namelist()

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        sio = require("skops.io", self.extra, self.name)
        skops_errors = require("skops.io.exceptions", self.extra, self.name)
        path = primary_file(root, manifest, _SUFFIXES)
        # NOTE: declared member sizes first: schema.json is inflated whole to be parsed.
        check_zip_expansion(path, policy.expansion_limit(path.stat().st_size))
        gate = unpickler.GlobalPolicy(policy.trusted_globals, path.name)
        refused = sorted(t for t in schema_types(_read_schema(path)) if not gate.admits(t))
        if refused:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version}: {path.name} names types that are not on the "
                f"allowlist: {refused}; add them to SERVING_TRUSTED_GLOBALS only if you trust them like code"
            )
        try:
            # NOTE: every name passed our exact list; skops audits the tree again against it.
            untrusted = sio.get_untrusted_types(file=path)
            model = sio.load(path, trusted=untrusted)
        except skops_errors.UntrustedTypesFoundException as exc:
            raise UntrustedArtifact(f"{manifest.name}:{manifest.version}: {exc}") from exc
        return checked_estimator(model, path, manifest, policy)


def _read_schema(path: Path) -> Any:
    try:
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(_SCHEMA))
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise LoadError(f"{path.name} has no readable {_SCHEMA}: {exc}") from exc
