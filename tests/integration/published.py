"""Versions published into a local store and pulled into a real loader cache, for the tests of
what loads them (model workers, shared workers, the isolation probe)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from serving.cache import CachedVersion, LoaderCache
from serving.publish import publish_path
from serving.repository import Repository
from serving.save import save
from serving.store.local import LocalStore


class Versions:
    """Publishes artifacts (``add``) or torch modules (``module``) as ``m<random>:1``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repo = Repository(LocalStore(str(root / "store")))
        self.cache = LoaderCache(root / "cache", max_bytes=10**10)

    def fetch(self, name: str) -> CachedVersion:
        return self.cache.fetch(self.repo, self.repo.resolve(f"{name}:1"))

    def add(self, path: Path, fmt: str, **kwargs: Any) -> CachedVersion:
        name = f"m{uuid.uuid4().hex[:8]}"
        publish_path(self.repo, path, name, version="1", format=fmt, **kwargs)
        return self.fetch(name)

    def module(self, module: Any, example: list[list[float]] | None = None) -> CachedVersion:
        name = f"m{uuid.uuid4().hex[:8]}"
        save(module, name, version="1", store=self.repo, example=example or [[0.0, 1.0]])
        return self.fetch(name)
