"""``skops``: scikit-learn estimators saved with ``skops.io.dump``.

A skops file is a zip of a JSON schema and ``.npy`` arrays; loading builds
objects from the schema instead of unpickling. skops trusts its own list of
types (sklearn estimators, numpy and scipy types, builtins containers); any
other type or function the schema names must be listed in
``LoadPolicy.trusted_globals`` (``SERVING_TRUSTED_GLOBALS``), or the file is
refused before anything is constructed. ``trusted=True`` is never used.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from serving.errors import UntrustedArtifact
from serving.manifest import Manifest

from ._common import default_inputs, primary_file, require
from .base import Format, LoadPolicy, Predictor
from .pickled import EstimatorPredictor

_SUFFIXES = (".skops",)


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
            return "schema.json" in z.namelist()

    def load(self, root: Path, manifest: Manifest, policy: LoadPolicy) -> Predictor:
        sio = require("skops.io", self.extra, self.name)
        skops_errors = require("skops.io.exceptions", self.extra, self.name)
        path = primary_file(root, manifest, _SUFFIXES)
        # NOTE: get_untrusted_types reads the schema only; nothing is imported or built yet.
        untrusted = sorted(sio.get_untrusted_types(file=path))
        refused = [t for t in untrusted if t not in policy.trusted_globals]
        if refused:
            raise UntrustedArtifact(
                f"{manifest.name}:{manifest.version}: {path.name} names types skops does not trust: "
                f"{refused}; add them to SERVING_TRUSTED_GLOBALS only if you trust them like code"
            )
        try:
            # NOTE: skops audits the tree again against the same list before constructing.
            model = sio.load(path, trusted=untrusted)
        except skops_errors.UntrustedTypesFoundException as exc:
            raise UntrustedArtifact(f"{manifest.name}:{manifest.version}: {exc}") from exc
        return EstimatorPredictor(model, default_inputs(manifest, "FP64"), manifest.outputs)
