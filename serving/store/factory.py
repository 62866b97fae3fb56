"""Pick the store class from the URI scheme."""

from __future__ import annotations

from urllib.parse import urlparse

from serving.errors import InvalidReference
from serving.settings import Settings, get_settings
from serving.store.base import ObjectStore


def open_store(uri: str | None = None, settings: Settings | None = None) -> ObjectStore:
    """Open ``s3://bucket/prefix``, ``oci://registry/namespace``, ``file:///abs/path`` or a plain folder path.

    Example:
        >>> store = open_store("/tmp/model-store")  # doctest: +SKIP
    """
    settings = settings or get_settings()
    uri = uri or settings.store
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        from serving.store.s3 import S3Store

        return S3Store(uri, settings)
    if scheme == "oci":
        from serving.store.oci import OciStore

        return OciStore(uri, settings)
    if scheme in {"", "file"}:
        from serving.store.local import LocalStore

        return LocalStore(uri, max_get_bytes=settings.max_metadata_bytes)
    raise InvalidReference(f"unsupported store URI {uri!r}: use a path, file://, s3:// or oci://")
