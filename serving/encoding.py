"""Stored encodings of artifact files: compression and client-side encryption.

On publish, :func:`encode_file` turns a plaintext file into the object that is
stored (compress, then encrypt) and records both digests in its
:class:`~serving.manifest.FileEntry`. On pull, :func:`download_decoded`
streams the stored object to disk while hashing it, refuses it unless its size
and sha256 match ``stored_size``/``stored_sha256`` (so no decoder ever sees
bytes the manifest does not vouch for), then decodes it chunk by chunk into
the plaintext file, whose size and sha256 must match ``size``/``sha256``.

Example:
    >>> entry, stored = encode_file(src, workdir, entry, "iris", "3", EncodeOptions("zstd"))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from serving.compression import DecompressingWriter, compress_file
from serving.crypto import Context, DecryptingWriter, Kek, Keyring, KmsKek, LocalKek, encrypt_file
from serving.errors import IntegrityError, InvalidRequest, NotFound
from serving.fileio import HashingWriter
from serving.manifest import FileEntry
from serving.settings import Settings
from serving.store.base import ObjectStore, Progress, Sink

__all__ = [
    "EncodeOptions",
    "download_decoded",
    "encode_file",
    "kek_from_settings",
    "keyring_from_settings",
]

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class EncodeOptions:
    """How to store files: ``compress`` is ``zstd``/``gzip``/None; ``kek`` encrypts."""

    compress: str | None = None
    kek: Kek | None = None

    def __bool__(self) -> bool:
        return bool(self.compress or self.kek)


def kek_from_settings(settings: Settings) -> Kek | None:
    """The key that encrypts on publish: a KMS key, a key file, or an inline key."""
    if settings.encryption_kms_key_id:
        return KmsKek(settings.encryption_kms_key_id)
    if settings.encryption_key_file is not None:
        return LocalKek.from_file(settings.encryption_key_file)
    if settings.encryption_key is not None:
        return LocalKek.from_text(settings.encryption_key.get_secret_value(), "SERVING_ENCRYPTION_KEY")
    return None


def keyring_from_settings(settings: Settings) -> Keyring:
    """Every key this process may decrypt with (all configured, not just one)."""
    keks: list[Kek] = []
    if settings.encryption_kms_key_id:
        keks.append(KmsKek(settings.encryption_kms_key_id))
    if settings.encryption_key_file is not None:
        keks.append(LocalKek.from_file(settings.encryption_key_file))
    if settings.encryption_key is not None:
        keks.append(LocalKek.from_text(settings.encryption_key.get_secret_value(), "SERVING_ENCRYPTION_KEY"))
    return Keyring(keks)


def encode_file(
    src: Path, workdir: Path, entry: FileEntry, name: str, version: str, options: EncodeOptions
) -> tuple[FileEntry, Path]:
    """Encode ``src`` into ``workdir``; returns the entry with stored fields and the stored file.

    With no options, returns ``(entry, src)`` unchanged.
    """
    if not options:
        return entry, src
    encoding: list[str] = []
    current = src
    size, sha = entry.size, entry.sha256
    if options.compress:
        out = workdir / f"{uuid.uuid4().hex}.{options.compress}"
        size, sha = compress_file(current, out, options.compress)
        encoding.append(options.compress)
        current = out
    if options.kek is not None:
        out = workdir / f"{uuid.uuid4().hex}.aesgcm"
        size, sha = encrypt_file(current, out, options.kek, Context(name, version, entry.path))
        encoding.append("aesgcm")
        if current != src:
            current.unlink()
        current = out
    updated = entry.model_copy(update={"encoding": encoding, "stored_size": size, "stored_sha256": sha})
    return FileEntry.model_validate(updated.model_dump()), current


def download_decoded(
    store: ObjectStore,
    key: str,
    entry: FileEntry,
    label: str,
    out: BinaryIO,
    workdir: Path,
    keyring: Keyring | None,
    context: Context,
    progress: Progress | None = None,
) -> int:
    """Download an encoded object, verify it, decode it into ``out``; returns stored bytes.

    The stored object is kept in ``workdir`` (0600) until it has verified.

    Raises:
        IntegrityError: stored or plaintext size/digest mismatch, a chunk that fails
            authentication, or a decompression bomb. Nothing is decoded before the
            stored digest has matched.
        InvalidRequest: the file is encrypted and no configured key can decrypt it.
    """
    if not entry.encoding or entry.stored_size is None or entry.stored_sha256 is None:
        raise InvalidRequest(f"{label}: not an encoded file")
    part = workdir / f"{uuid.uuid4().hex}.stored"
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            stored = HashingWriter(f, entry.stored_size, label, "stored")
            try:
                store.download(key, stored, progress)
            except NotFound as exc:
                raise IntegrityError(f"{label}: listed in the manifest but not stored") from exc
        stored.check(entry.stored_size, entry.stored_sha256)
        plain = HashingWriter(out, entry.size, label, "plaintext")
        chain, closers = _decoder_chain(entry, plain, keyring, context, label)
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK):
                chain.write(chunk)
        for close in closers:
            close()
        plain.check(entry.size, entry.sha256)
        return stored.size
    finally:
        part.unlink(missing_ok=True)


def _decoder_chain(
    entry: FileEntry, sink: Sink, keyring: Keyring | None, context: Context, label: str
) -> tuple[Sink, list[Callable[[], None]]]:
    """Writers that undo ``entry.encoding``, and their close() calls, outermost first.

    The first encoding applied on publish is undone last, so it sits next to ``sink``.
    """
    assert entry.encoding
    current: Sink = sink
    closers: list[Callable[[], None]] = []
    for step in entry.encoding:
        if step == "aesgcm":
            if not keyring:
                raise InvalidRequest(
                    f"{label} is encrypted; configure SERVING_ENCRYPTION_KEY_FILE, "
                    "SERVING_ENCRYPTION_KEY or SERVING_ENCRYPTION_KMS_KEY_ID"
                )
            writer: DecryptingWriter | DecompressingWriter = DecryptingWriter(current, keyring, context)
        else:
            # NOTE: the bomb limit is the plaintext size the (signed) manifest declares.
            writer = DecompressingWriter(current, step, entry.size, label)
        current = writer
        closers.append(writer.close)
    return current, list(reversed(closers))
