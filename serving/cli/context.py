"""What every command shares: the store, cache and settings it works on, and how it prints."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import InvalidRequest
from serving.manifest import ModelRef

if TYPE_CHECKING:
    from serving.cache import CachedVersion, LoaderCache
    from serving.manifest import Manifest
    from serving.progress import ProgressFactory
    from serving.repository import Repository
    from serving.settings import Settings

log = logging.getLogger(__name__)

PROG = "serving"


@dataclass
class Context:
    """What every verb needs, built lazily so ``--help`` and usage errors stay cheap."""

    store: str | None
    as_json: bool
    _settings: Settings | None = field(default=None, init=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from pydantic import ValidationError

            from serving.settings import get_settings

            try:
                self._settings = get_settings(store=self.store)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err.get("loc", ()))
                raise InvalidRequest(f"invalid setting SERVING_{where.upper()}: {err['msg']}") from exc
        return self._settings

    @cached_property
    def repo(self) -> Repository:
        from serving.repository import Repository
        from serving.store import open_store

        return Repository(open_store(self.settings.store, self.settings))

    @cached_property
    def cache(self) -> LoaderCache:
        from serving.cache import LoaderCache

        return LoaderCache.from_settings(self.settings)

    @property
    def progress(self) -> ProgressFactory | None:
        from serving.progress import progress_factory

        return progress_factory(self.settings.progress)

    def emit(self, text: str, data: Any) -> None:
        """Print ``data`` as JSON with ``--json``, else the human line ``text``."""
        if self.as_json:
            print(json.dumps(data, indent=2, default=json_default))
        else:
            print(text)

    def pull(self, ref: str) -> tuple[CachedVersion, bool]:
        """Resolve ``ref`` and bring its version into the cache (a prefetch: a cached copy whose
        stat stamp holds is a hit without a re-hash); ``(cached, offline)``."""
        resolved, offline = self.cache.resolve(self.repo, ModelRef.parse(ref))
        return self.cache.fetch(self.repo, resolved, self.progress, prefetch=True), offline


def json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def version_text(manifest: Manifest) -> str:
    """``iris:3 (pickle, 1 file, 1.2 KiB)``: a published version, as publish and import print it."""
    files, size = plural(len(manifest.files), "file"), human_bytes(manifest.total_bytes)
    return f"{manifest.name}:{manifest.version} ({manifest.format}, {files}, {size})"


def alias_text(manifest: Manifest, alias: str | None) -> str:
    """The line that says an alias moved to the new version (``''`` when none was named)."""
    return f"\n{manifest.name}@{alias} -> {manifest.version}" if alias else ""


def load_json(text: str, what: str) -> Any:
    """``text`` as JSON; ``@path`` reads a file and ``-`` reads stdin."""
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            text = Path(text[1:]).read_text()
    except OSError as exc:
        raise InvalidRequest(f"{what}: cannot read {text[1:]}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from exc
