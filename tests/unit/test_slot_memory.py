"""What a load in the serving process counts against a budget: its growth, or its files
when it imported modules (memory that stays with the process, not with the model)."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving.cache import CachedVersion, LoaderCache
from serving.formats.base import LoadPolicy, Predictor
from serving.manifest import Manifest, TensorSpec
from serving.repository import Repository, collect_files, file_entries
from serving.runtime.slot import ModelSlot
from serving.store.local import LocalStore

SPEC = [TensorSpec(name="x", datatype="FP64", shape=[-1, 1])]
MIB = 1024**2
HELD = 48 * MIB


class Holding(Predictor):
    """A model that holds ``payload`` (touched, so resident)."""

    inputs = SPEC
    outputs = SPEC

    def __init__(self, payload: object) -> None:
        self.payload = payload

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": inputs["x"]}


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository(LocalStore(str(tmp_path / "store")))
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.json").write_text(json.dumps({"v": 1}))
    files = collect_files(src)
    repo.publish(Manifest(name="m", version="1", format="test", files=file_entries(files)), files)
    return repo


@pytest.fixture
def framework(tmp_path: Path) -> Iterator[str]:
    """A module never imported yet that holds ``HELD`` bytes once imported (a framework)."""
    name = f"framework_{uuid.uuid4().hex}"
    modules = tmp_path / "modules"  # NOTE: alone on sys.path, not the test's other folders
    modules.mkdir()
    (modules / f"{name}.py").write_text(f"HELD = bytearray(b'\\x01') * {HELD}\n")
    sys.path.insert(0, str(modules))
    yield name
    sys.path.remove(str(modules))
    sys.path_importer_cache.pop(str(modules), None)
    sys.modules.pop(name, None)


def _loaded_bytes(repo: Repository, tmp_path: Path, loader: object) -> tuple[int, int]:
    slot = ModelSlot("m", repo, LoaderCache(tmp_path / "cache"), loader=loader, warmup=False)  # type: ignore[arg-type]
    try:
        live = slot.load(repo.resolve("m:1"))
        try:
            return live.memory_bytes, live.manifest.total_bytes
        finally:
            live.predictor.close()
    finally:
        slot.close()


def test_a_load_counts_what_it_grew_the_process_by(repo: Repository, tmp_path: Path) -> None:
    def loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
        return Holding(bytearray(b"\x01") * HELD)

    counted, files = _loaded_bytes(repo, tmp_path, loader)
    assert files < MIB
    assert counted >= HELD * 0.9


def test_a_load_that_imports_a_framework_counts_its_files_not_the_framework(
    repo: Repository, tmp_path: Path, framework: str
) -> None:
    def loader(cached: CachedVersion, policy: LoadPolicy) -> Predictor:
        return Holding(importlib.import_module(framework))

    counted, files = _loaded_bytes(repo, tmp_path, loader)
    assert counted == files
