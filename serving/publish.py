"""Publish an artifact that is already saved on disk as a new immutable version."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.errors import InvalidRequest
from serving.manifest import Manifest, TensorSpec, check_name
from serving.repository import Repository, SetTarget, collect_files, file_entries
from serving.store.base import Progress

if TYPE_CHECKING:
    from serving.encoding import EncodeOptions
    from serving.signing import SigningKey


def publish_path(
    repo: Repository,
    path: Path,
    name: str,
    *,
    version: str | None = None,
    format: str | None = None,
    alias: str | None = None,
    framework: str | None = None,
    framework_version: str | None = None,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    example: Any = None,
    options: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    progress: Any = None,
    signing_key: SigningKey | None = None,
    encode: EncodeOptions | None = None,
    oms_signature: bytes | None = None,
) -> Manifest:
    """Hash and upload ``path`` (a file or a directory), then write the manifest last.

    The format is detected from content and extension unless ``format`` is given.
    With ``signing_key``, ``manifest.sig`` is written just before the manifest
    (:mod:`serving.signing`), so the version is never visible unsigned; so is
    ``oms_signature``, an OpenSSF model signature over the files (:mod:`serving.oms`).
    With ``encode``, files are stored compressed and/or encrypted
    (:mod:`serving.encoding`); the manifest keeps both digests of each.
    The version defaults to the next integer. With ``alias``, the alias is moved to
    the new version after the manifest is written.

    Raises:
        UnknownFormat: nothing recognises the artifact.
        VersionExists: the version is already published.
    """
    from serving.formats import detect_format, get_format

    check_name(name, "model name")
    path = Path(path)
    if not path.exists():
        raise InvalidRequest(f"{path}: no such file or directory")
    fmt = get_format(format) if format else get_format(detect_format(path))
    files = collect_files(path)
    if not files:
        raise InvalidRequest(f"{path}: nothing to publish (empty directory)")
    version = check_name(version, "version") if version else repo.next_version(name)
    with tempfile.TemporaryDirectory(prefix="serving-publish-") as workdir:
        entries = file_entries(files)
        if encode:
            from serving.encoding import encode_file

            encoded = [
                encode_file(src, Path(workdir), entry, name, version, encode)
                for (_, src), entry in zip(files, entries, strict=True)
            ]
            entries = [entry for entry, _ in encoded]
            files = [(rel, stored) for (rel, _), (_, stored) in zip(files, encoded, strict=True)]
        manifest = Manifest(
            name=name,
            version=version,
            format=fmt.name,
            files=entries,
            framework=framework or fmt.framework,
            framework_version=framework_version or fmt.framework_version(),
            python_version=platform.python_version(),
            inputs=inputs,
            outputs=outputs,
            example=example,
            options=options or {},
            metadata=metadata or {},
        )
        progress_for = None
        if progress is not None:

            def progress_for(size: int) -> Progress | None:
                return progress(name, size)  # type: ignore[no-any-return]

        signer = None
        if signing_key is not None:
            from serving.signing import sign_manifest

            key = signing_key

            def signer(raw: bytes) -> bytes:
                return sign_manifest(raw, key)

        repo.publish(manifest, files, progress_for, signer=signer, oms_signature=oms_signature)
    if alias:
        writer = None
        if signing_key is not None:
            from serving.signing import alias_signer

            writer = alias_signer(signing_key)
        repo.move_alias(name, alias, SetTarget(version), writer=writer)
    return manifest
