"""Publish plain bytes as a version: test data without any framework."""

from __future__ import annotations

from pathlib import Path

from serving.manifest import Manifest
from serving.repository import Repository, collect_files, file_entries


def publish_files(
    repo: Repository, workdir: Path, name: str, version: str, files: dict[str, bytes], fmt: str = "raw"
) -> str:
    """Write ``files`` (relative path -> bytes) under ``workdir`` and publish them as ``name:version``.

    Returns the manifest's sha256 (what aliases and the cache key on).
    """
    root = Path(workdir) / f"publish-{name}-{version}"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    found = collect_files(root)
    manifest = Manifest(name=name, version=version, format=fmt, files=file_entries(found))
    return repo.publish(manifest, found)
