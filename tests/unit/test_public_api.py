"""The public surface: ``serving.__all__`` is exactly what is public, and importing is cheap."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

import serving


def _public_names() -> list[str]:
    """Public attributes of the package that are not its submodules."""
    return sorted(
        name
        for name in dir(serving)
        if (not name.startswith("_") or name == "__version__")
        and not isinstance(getattr(serving, name), types.ModuleType)
    )


def test_all_lists_exactly_the_public_names() -> None:
    """Like httpx's test: every public attribute is in __all__ and vice versa."""
    assert sorted(serving.__all__) == _public_names()


def test_all_is_the_documented_surface() -> None:
    assert set(serving.__all__) == {
        "save",
        "load",
        "Predictor",
        "Manifest",
        "ModelRef",
        "Repository",
        "LoaderCache",
        "open_store",
        "Settings",
        "ServingError",
        "__version__",
    }


def test_every_exported_name_resolves_to_serving_code() -> None:
    for name in serving.__all__:
        value = getattr(serving, name)
        if name != "__version__":
            assert value.__module__.startswith("serving."), name


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        serving.no_such_thing  # type: ignore[attr-defined]  # noqa: B018


def test_import_is_light() -> None:
    """`import serving` pulls in no framework, boto3 or numpy; names load on first use."""
    code = (
        "import json, sys, serving;"
        "heavy = ['sklearn', 'torch', 'tensorflow', 'keras', 'onnxruntime', 'boto3', 'numpy', 'ray'];"
        "print(json.dumps([m for m in heavy if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_save_stays_the_function_after_its_module_is_imported() -> None:
    """`import serving.save` (the module) must not shadow `serving.save` (the function)."""
    code = (
        "import serving.save, serving;"
        "from serving.save import save, load;"
        "print(serving.save is save and serving.load is load and callable(serving.save))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_star_import_gives_all() -> None:
    namespace: dict[str, object] = {}
    exec("from serving import *", namespace)  # noqa: S102 -- NOTE: what a user's star import does
    assert set(serving.__all__) <= set(namespace)
