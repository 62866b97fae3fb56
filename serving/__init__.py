"""serving: versioned model store, digest-checked loader cache, hot-swapping Ray Serve worker.

The public surface is small; everything else is reachable by module but not promised::

    import serving

    serving.save(model, "iris", alias="production", example=[[5.1, 3.5, 1.4, 0.2]])
    predictor = serving.load("iris@production")
    predictor.predict_rows([[5.1, 3.5, 1.4, 0.2]])

Names are imported on first use, so ``import serving`` does not import numpy,
scikit-learn, torch or boto3.
"""

# NOTE: no `from __future__ import annotations` and only private helper names here:
# every public name of this module is part of the API (tests/unit/test_public_api.py).
import sys as _sys
import types as _types
import typing as _typing
from importlib import import_module as _import_module
from importlib import metadata as _metadata

from serving.errors import ServingError

if _typing.TYPE_CHECKING:
    from serving.cache import LoaderCache
    from serving.formats.base import Predictor
    from serving.manifest import Manifest, ModelRef
    from serving.repository import Repository
    from serving.save import load, save
    from serving.settings import Settings
    from serving.store import open_store

try:
    __version__ = _metadata.version("serving")
except _metadata.PackageNotFoundError:  # NOTE: running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LoaderCache",
    "Manifest",
    "ModelRef",
    "Predictor",
    "Repository",
    "ServingError",
    "Settings",
    "__version__",
    "load",
    "open_store",
    "save",
]

_LAZY = {
    "LoaderCache": "serving.cache",
    "Manifest": "serving.manifest",
    "ModelRef": "serving.manifest",
    "Predictor": "serving.formats.base",
    "Repository": "serving.repository",
    "Settings": "serving.settings",
    "load": "serving.save",
    "open_store": "serving.store",
    "save": "serving.save",
}


_FUNCTIONS_NAMED_LIKE_MODULES = frozenset({"save", "load"})


class _Package(_types.ModuleType):
    """Keeps ``serving.save`` the function once the module ``serving.save`` is imported.

    NOTE: importing a submodule binds it as an attribute of its package, so a plain
    ``import serving.save`` anywhere would make ``serving.save(model, ...)`` call a
    module. The function stays reachable; the module is still ``sys.modules["serving.save"]``.
    """

    def __setattr__(self, name: str, value: _typing.Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_MODULES and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
