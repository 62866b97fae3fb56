"""Compression and encryption at rest, through publish -> store -> cache, on a folder and on S3."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from serving.cache import LoaderCache
from serving.compression import compress_file
from serving.crypto import Keyring, KmsKek, LocalKek
from serving.encoding import EncodeOptions, keyring_from_settings
from serving.errors import IntegrityError, InvalidRequest
from serving.manifest import MANIFEST_NAME
from serving.publish import publish_path
from serving.repository import Repository
from serving.settings import Settings
from serving.store.factory import open_store
from serving.testing import MotoS3


def artifact(tmp_path: Path, size: int = 300_000) -> Path:
    """A compressible 'model': half random, half zeros."""
    path = tmp_path / "model.pkl"
    path.write_bytes(os.urandom(size // 2) + b"\0" * (size - size // 2))
    return path


def pull(repo: Repository, settings: Settings, ref: str, keyring: Keyring | None = None) -> bytes:
    cache = LoaderCache(settings.cache_dir, keyring=keyring)
    resolved = repo.resolve(ref)
    cached = cache.fetch(repo, resolved)
    return (cached.path / resolved.manifest.files[0].path).read_bytes()


@pytest.mark.parametrize("compress", ["zstd", "gzip"])
def test_compressed_version_round_trips(
    compress: str, repo: Repository, settings: Settings, tmp_path: Path
) -> None:
    """A version stored compressed is smaller in the store and identical in the cache."""
    src = artifact(tmp_path)
    manifest = publish_path(repo, src, "m", format="pickle", encode=EncodeOptions(compress=compress))
    entry = manifest.files[0]
    assert entry.encoding == [compress]
    assert entry.stored_size is not None
    assert entry.stored_size < entry.size
    assert repo.version_files("m", "1")["model.pkl"] == entry.stored_size
    assert pull(repo, settings, "m:1") == src.read_bytes()


def test_compressed_and_encrypted_version_round_trips(
    repo: Repository, settings: Settings, tmp_path: Path
) -> None:
    """zstd then AES-GCM: the stored object is neither plaintext nor compressed plaintext."""
    kek = LocalKek(os.urandom(32))
    src = artifact(tmp_path)
    manifest = publish_path(repo, src, "m", format="pickle", encode=EncodeOptions("zstd", kek))
    assert manifest.files[0].encoding == ["zstd", "aesgcm"]
    stored = io.BytesIO()
    repo.store.download("m/versions/1/model.pkl", stored)
    assert src.read_bytes()[:1000] not in stored.getvalue()
    assert pull(repo, settings, "m:1", Keyring([kek])) == src.read_bytes()


def test_encrypted_version_without_the_key_is_refused(
    repo: Repository, settings: Settings, tmp_path: Path
) -> None:
    """Pulling an encrypted version with another key names the key id it needs, and caches nothing."""
    kek = LocalKek(os.urandom(32))
    publish_path(repo, artifact(tmp_path), "m", format="pickle", encode=EncodeOptions(kek=kek))
    with pytest.raises(InvalidRequest, match=kek.kek_id):
        pull(repo, settings, "m:1", Keyring([LocalKek(os.urandom(32))]))
    assert not list((settings.cache_dir / "blobs").rglob("*"))


def test_tampered_stored_bytes_are_refused_before_decoding(
    repo: Repository, settings: Settings, tmp_path: Path
) -> None:
    """A stored object that differs from stored_sha256 is refused; nothing reaches the decoder."""
    publish_path(repo, artifact(tmp_path), "m", format="pickle", encode=EncodeOptions("zstd"))
    key = "m/versions/1/model.pkl"
    buf = io.BytesIO()
    repo.store.download(key, buf)
    data = bytearray(buf.getvalue())
    data[-1] ^= 1
    (tmp_path / "tampered").write_bytes(bytes(data))
    repo.store.upload(key, tmp_path / "tampered")
    with pytest.raises(IntegrityError, match="stored sha256"):
        pull(repo, settings, "m:1")


def test_decompression_bomb_is_refused(repo: Repository, settings: Settings, tmp_path: Path) -> None:
    """A rewritten manifest vouching for a zstd bomb still stops at the declared plaintext size."""
    publish_path(repo, artifact(tmp_path, 1000), "m", format="pickle", encode=EncodeOptions("zstd"))
    bomb_src = tmp_path / "zeros"
    with open(bomb_src, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    bomb = tmp_path / "bomb.zst"
    size, sha = compress_file(bomb_src, bomb, "zstd")
    repo.store.upload("m/versions/1/model.pkl", bomb)
    raw, _ = repo.store.get(f"m/versions/1/{MANIFEST_NAME}")
    doc = json.loads(raw)
    doc["files"][0].update(stored_size=size, stored_sha256=sha)
    repo.store.put(f"m/versions/1/{MANIFEST_NAME}", json.dumps(doc).encode())
    with pytest.raises(IntegrityError, match="decompression bomb"):
        pull(repo, settings, "m:1")
    assert not list((settings.cache_dir / "blobs").rglob("*"))


@pytest.mark.s3
def test_kms_wrapped_data_keys_round_trip(bucket: str, make_settings: Any, tmp_path: Path) -> None:
    """With a KMS key (moto), data keys are wrapped by KMS and unwrapped on pull."""
    import boto3

    key_id = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
    settings = make_settings(tmp_path / "cache", store=f"s3://{bucket}/models", encryption_kms_key_id=key_id)
    repo = Repository(open_store(settings.store, settings))
    src = artifact(tmp_path)
    manifest = publish_path(repo, src, "m", format="pickle", encode=EncodeOptions("zstd", KmsKek(key_id)))
    assert manifest.files[0].encoding == ["zstd", "aesgcm"]
    cache = LoaderCache(settings.cache_dir, keyring=keyring_from_settings(settings))
    cached = cache.fetch(repo, repo.resolve("m:1"))
    assert (cached.path / "model.pkl").read_bytes() == src.read_bytes()


@pytest.mark.s3
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({"s3_sse": "AES256"}, "AES256"), ({"s3_sse": "aws:kms"}, "aws:kms")],
    ids=["sse-s3", "sse-kms"],
)
def test_server_side_encryption_is_requested_on_upload(
    overrides: dict[str, str],
    expected: str,
    bucket: str,
    s3_env: MotoS3,
    make_settings: Any,
    tmp_path: Path,
) -> None:
    """Every uploaded object, manifest included, is stored with the configured SSE."""
    if expected == "aws:kms":
        import boto3

        kms_key = boto3.client("kms").create_key()["KeyMetadata"]["KeyId"]
        overrides = {**overrides, "s3_sse_kms_key_id": kms_key}
    settings = make_settings(tmp_path / "cache", store=f"s3://{bucket}/models", **overrides)
    repo = Repository(open_store(settings.store, settings))
    publish_path(repo, artifact(tmp_path, 1000), "m", format="pickle")
    client = s3_env.client()
    for key in ("models/m/versions/1/model.pkl", f"models/m/versions/1/{MANIFEST_NAME}"):
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ServerSideEncryption"] == expected
    assert pull(repo, settings, "m:1") == (tmp_path / "model.pkl").read_bytes()


@pytest.mark.s3
def test_sse_c_round_trips_and_the_key_stays_secret(bucket: str, make_settings: Any, tmp_path: Path) -> None:
    """With an SSE-C key, publish and pull work, and the key appears in no settings repr."""
    sse_key = base64.b64encode(os.urandom(32)).decode()
    settings = make_settings(tmp_path / "cache", store=f"s3://{bucket}/models", s3_sse_c_key=sse_key)
    assert sse_key not in repr(settings)
    repo = Repository(open_store(settings.store, settings))
    publish_path(repo, artifact(tmp_path, 1000), "m", format="pickle")
    assert pull(repo, settings, "m:1") == (tmp_path / "model.pkl").read_bytes()


def test_bad_sse_c_key_is_refused_without_echoing_it(make_settings: Any, tmp_path: Path) -> None:
    """A malformed SSE-C key is refused at store creation; the message does not contain it."""
    settings = make_settings(tmp_path / "cache", store="s3://b/p", s3_sse_c_key="c2VjcmV0LWJ1dC1zaG9ydA==")
    with pytest.raises(InvalidRequest) as info:
        open_store(settings.store, settings)
    assert "c2VjcmV0" not in str(info.value)


@pytest.mark.s3
def test_sse_c_key_never_reaches_botocore_debug_logs(
    bucket: str, make_settings: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With boto3's DEBUG logging on, neither the SSE-C key nor its base64 appears in any record."""
    raw = os.urandom(32)
    sse_key = base64.b64encode(raw).decode()
    settings = make_settings(tmp_path / "cache", store=f"s3://{bucket}/models", s3_sse_c_key=sse_key)
    repo = Repository(open_store(settings.store, settings))
    with caplog.at_level(logging.DEBUG):
        publish_path(repo, artifact(tmp_path, 1000), "m", format="pickle")
        assert pull(repo, settings, "m:1") == (tmp_path / "model.pkl").read_bytes()
    library = [r for r in caplog.records if r.name.startswith(("botocore", "urllib3", "s3transfer"))]
    assert library, "botocore wrote no DEBUG records: the test would prove nothing"
    text = "\n".join(r.getMessage() for r in library)
    assert "***" in text, "the key was not present to redact: the test would prove nothing"
    assert sse_key not in text
    assert repr(raw) not in text
