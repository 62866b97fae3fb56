"""Client-side envelope encryption: chunked AES-256-GCM under a wrapped data key.

Each file gets a fresh random 256-bit data key. The data key is wrapped by a
key-encryption key (KEK): a local 256-bit key (from a file or the
environment) or an AWS KMS key. The stored file is::

    header   b"SRVAEAD1" | u16 len | header JSON (kek, wrapped data key, chunk size)
    records  nonce (12 random bytes) | AES-GCM(chunk) with its 16-byte tag, repeated

Every chunk's associated data binds ``sha256(header)``, the model, the
version, the file path, the chunk index and a final flag, so chunks cannot be
moved between files or versions, reordered, dropped, or truncated at a chunk
boundary (the last record must carry the final flag). The header itself is
bound the same way, so its chunk size or wrapped key cannot be swapped.

Example:
    >>> kek = LocalKek.from_file(Path("/etc/serving/kek"))  # doctest: +SKIP
    >>> ctx = Context("iris", "3", "model.joblib")  # doctest: +SKIP
    >>> encrypt_file(Path("model.joblib"), Path("model.joblib.enc"), kek, ctx)  # doctest: +SKIP
    >>> w = DecryptingWriter(out_file, Keyring([kek]), ctx); w.write(data); w.close()  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from serving.errors import IntegrityError, InvalidRequest, StoreError
from serving.fileio import HashingWriter
from serving.store.base import Sink

__all__ = [
    "DEFAULT_CHUNK",
    "Context",
    "DecryptingWriter",
    "Kek",
    "Keyring",
    "KmsKek",
    "LocalKek",
    "encrypt_file",
    "generate_kek",
]

MAGIC = b"SRVAEAD1"
DEFAULT_CHUNK = 1024 * 1024
_NONCE = 12
_TAG = 16
_MAX_HEADER = 16 * 1024
_MAX_CHUNK = 64 * 1024 * 1024


@dataclass(frozen=True)
class Context:
    """What a ciphertext is bound to: it decrypts only as this file of this version."""

    name: str
    version: str
    path: str

    def encoded(self) -> bytes:
        return json.dumps([self.name, self.version, self.path]).encode()

    def kms_context(self) -> dict[str, str]:
        return {"serving:model": self.name, "serving:version": self.version, "serving:path": self.path}


class Kek(ABC):
    """A key-encryption key: wraps and unwraps per-file data keys."""

    kek_id: str
    """Names the KEK without revealing it: ``local:<fingerprint>`` or ``kms:<key id>``."""

    @abstractmethod
    def wrap(self, data_key: bytes, ctx: Context) -> bytes: ...

    @abstractmethod
    def unwrap(self, wrapped: bytes, ctx: Context) -> bytes: ...


def generate_kek(path: Path) -> None:
    """Write a new random 256-bit KEK, base64, mode 0600; refuses to overwrite."""
    if path.exists():
        raise InvalidRequest(f"{path} already exists; refusing to overwrite a key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(os.urandom(32)) + b"\n")


class LocalKek(Kek):
    """A 256-bit KEK held locally (a mounted Secret file or an env variable)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise InvalidRequest("an encryption key must be 32 bytes (base64 of 32 random bytes)")
        self._aead = AESGCM(key)
        self.kek_id = "local:" + hashlib.sha256(b"serving.kek/v1" + key).hexdigest()[:16]

    def __repr__(self) -> str:  # NOTE: never print key material
        return f"LocalKek({self.kek_id})"

    @classmethod
    def from_text(cls, text: str | bytes, what: str = "encryption key") -> LocalKek:
        """Base64 of 32 bytes (what :func:`generate_kek` writes)."""
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"{what} is not base64") from exc
        if len(key) != 32:
            raise InvalidRequest(f"{what} must be base64 of exactly 32 bytes")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path) -> LocalKek:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidRequest(f"cannot read encryption key {path}: {exc.strerror}") from exc
        return cls.from_text(data, f"encryption key {path}")

    def wrap(self, data_key: bytes, ctx: Context) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aead.encrypt(nonce, data_key, b"serving.dek/v1" + ctx.encoded())

    def unwrap(self, wrapped: bytes, ctx: Context) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], b"serving.dek/v1" + ctx.encoded())
        except InvalidTag as exc:
            raise IntegrityError(
                f"{ctx.path}: the data key does not unwrap for this file and version"
            ) from exc


class KmsKek(Kek):
    """An AWS KMS key (boto3's ``kms`` Encrypt/Decrypt, with an encryption context).

    Credentials and endpoint come from boto3's standard chain
    (``AWS_ENDPOINT_URL_KMS`` for a local server).
    """

    def __init__(self, key_id: str, client: Any = None) -> None:
        import boto3

        self.key_id = key_id
        self.kek_id = f"kms:{key_id}"
        self._client = client or boto3.session.Session().client("kms")

    def _call(self, op: str, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, op)(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "InvalidCiphertextException":
                raise IntegrityError(f"KMS refused to unwrap the data key ({code})") from exc
            raise StoreError(f"KMS {op} failed ({code}) for key {self.key_id}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"KMS {op} failed for key {self.key_id}: {type(exc).__name__}") from exc

    def wrap(self, data_key: bytes, ctx: Context) -> bytes:
        resp = self._call(
            "encrypt", KeyId=self.key_id, Plaintext=data_key, EncryptionContext=ctx.kms_context()
        )
        return bytes(resp["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, ctx: Context) -> bytes:
        resp = self._call(
            "decrypt", KeyId=self.key_id, CiphertextBlob=wrapped, EncryptionContext=ctx.kms_context()
        )
        return bytes(resp["Plaintext"])


class Keyring:
    """The KEKs a reader holds, looked up by the id recorded in each file's header."""

    def __init__(self, keks: list[Kek]) -> None:
        self._by_id = {k.kek_id: k for k in keks}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def get(self, kek_id: str, label: str) -> Kek:
        kek = self._by_id.get(kek_id)
        if kek is None:
            have = ", ".join(sorted(self._by_id)) or "none"
            raise InvalidRequest(f"{label} is encrypted under {kek_id}; configured keys: {have}")
        return kek


def _aad(header_sha: bytes, ctx: Context, index: int, final: bool) -> bytes:
    return b"serving.aesgcm/v1" + header_sha + ctx.encoded() + struct.pack(">QB", index, int(final))


def encrypt_file(
    src: Path, dst: Path, kek: Kek, ctx: Context, chunk_size: int = DEFAULT_CHUNK
) -> tuple[int, str]:
    """Encrypt ``src`` into ``dst`` for ``ctx``; returns the stored size and sha256."""
    data_key = AESGCM.generate_key(bit_length=256)
    header = json.dumps(
        {
            "alg": "AES-256-GCM",
            "kek": kek.kek_id,
            "wrapped_key": base64.b64encode(kek.wrap(data_key, ctx)).decode("ascii"),
            "chunk_size": chunk_size,
        },
        sort_keys=True,
    ).encode()
    header_sha = hashlib.sha256(header).digest()
    aead = AESGCM(data_key)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        out = HashingWriter(fout)
        out.write(MAGIC + struct.pack(">H", len(header)) + header)
        index = 0
        chunk = fin.read(chunk_size)
        while True:
            # NOTE: read one chunk ahead, so the last record is known to be final.
            following = fin.read(chunk_size) if len(chunk) == chunk_size else b""
            final = not following
            nonce = os.urandom(_NONCE)
            out.write(nonce + aead.encrypt(nonce, chunk, _aad(header_sha, ctx, index, final)))
            if final:
                break
            chunk, index = following, index + 1
    return out.size, out.hexdigest()


class DecryptingWriter:
    """A sink that decrypts what is written into it and writes plaintext on.

    Plaintext is released a chunk at a time, each authenticated before it is
    written. Call :meth:`close` after the last write: it requires a final chunk.

    Raises:
        IntegrityError: a chunk fails authentication, is out of place, or the
            stream is truncated.
    """

    def __init__(self, sink: Sink, keyring: Keyring, ctx: Context) -> None:
        self._sink, self._keyring, self._ctx = sink, keyring, ctx
        self._buf = bytearray()
        self._aead: AESGCM | None = None
        self._header_sha = b""
        self._record = 0
        self._index = 0
        self._done = False
        self.output_size = 0

    def _label(self) -> str:
        return f"{self._ctx.name}:{self._ctx.version}/{self._ctx.path}"

    def _parse_header(self) -> bool:
        if len(self._buf) < len(MAGIC) + 2:
            return False
        if bytes(self._buf[: len(MAGIC)]) != MAGIC:
            raise IntegrityError(f"{self._label()}: not an encrypted serving file")
        (hlen,) = struct.unpack(">H", self._buf[len(MAGIC) : len(MAGIC) + 2])
        if hlen > _MAX_HEADER:
            raise IntegrityError(f"{self._label()}: encryption header too large")
        start = len(MAGIC) + 2
        if len(self._buf) < start + hlen:
            return False
        header_raw = bytes(self._buf[start : start + hlen])
        try:
            header = json.loads(header_raw)
            wrapped = base64.b64decode(header["wrapped_key"], validate=True)
            chunk_size = int(header["chunk_size"])
            kek_id = str(header["kek"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise IntegrityError(f"{self._label()}: malformed encryption header") from exc
        if header.get("alg") != "AES-256-GCM" or not 0 < chunk_size <= _MAX_CHUNK:
            raise IntegrityError(f"{self._label()}: unsupported encryption header")
        data_key = self._keyring.get(kek_id, self._label()).unwrap(wrapped, self._ctx)
        self._aead = AESGCM(data_key)
        self._header_sha = hashlib.sha256(header_raw).digest()
        self._record = _NONCE + chunk_size + _TAG
        del self._buf[: start + hlen]
        return True

    def _open(self, record: bytes, final: bool) -> None:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(
                record[:_NONCE], record[_NONCE:], _aad(self._header_sha, self._ctx, self._index, final)
            )
        except InvalidTag as exc:
            where = "final chunk (truncated?)" if final else f"chunk {self._index}"
            raise IntegrityError(f"{self._label()}: {where} fails authentication") from exc
        self._index += 1
        self.output_size += len(plain)
        self._sink.write(plain)

    def write(self, data: bytes) -> int:
        if self._done:
            raise IntegrityError(f"{self._label()}: data after the final chunk")
        self._buf += data
        if self._aead is None and not self._parse_header():
            return len(data)
        # NOTE: hold back one full record: only the stream's end says which is final.
        while len(self._buf) > self._record:
            record = bytes(self._buf[: self._record])
            del self._buf[: self._record]
            self._open(record, final=False)
        return len(data)

    def close(self) -> None:
        if self._aead is None:
            raise IntegrityError(f"{self._label()}: truncated before the encryption header ended")
        if len(self._buf) < _NONCE + _TAG:
            raise IntegrityError(f"{self._label()}: truncated (no final chunk)")
        self._open(bytes(self._buf), final=True)
        self._buf.clear()
        self._done = True
