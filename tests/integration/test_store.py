"""The store contract and the repository layout, on a folder and on a real S3 server.

Each test taking ``store`` or ``repo`` runs twice: LocalStore(tmp_path) and
S3Store(s3://<fresh bucket>/models) against moto on loopback.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from serving import errors
from serving.manifest import MANIFEST_NAME, Manifest
from serving.repository import Repository, Rollback, SetTarget, file_entries
from serving.settings import Settings
from serving.store.base import ObjectStore
from serving.store.factory import open_store
from serving.store.s3 import S3Store
from serving.testing import MotoS3, free_port, publish_files

MiB = 1024 * 1024


def publish(repo: Repository, tmp_path: Path, name: str, version: str, files: dict[str, bytes]) -> str:
    return publish_files(repo, tmp_path, name, version, files)


# -- store contract ------------------------------------------------------------------


def test_put_then_get_returns_the_bytes_and_an_etag(store: ObjectStore) -> None:
    store.put("a/b.json", b'{"x": 1}')
    data, etag = store.get("a/b.json")
    assert data == b'{"x": 1}'
    assert etag


def test_get_if_changed_returns_none_while_the_etag_matches(store: ObjectStore) -> None:
    store.put("m/aliases/prod.json", b"one")
    _, etag = store.get("m/aliases/prod.json")
    assert store.get_if_changed("m/aliases/prod.json", etag) == (None, etag)


def test_get_if_changed_returns_the_new_bytes_after_a_write(store: ObjectStore) -> None:
    store.put("m/aliases/prod.json", b"one")
    _, etag = store.get("m/aliases/prod.json")
    store.put("m/aliases/prod.json", b"two, longer")
    data, new_etag = store.get_if_changed("m/aliases/prod.json", etag)
    assert data == b"two, longer"
    assert new_etag != etag


@pytest.mark.s3
def test_unchanged_check_on_s3_is_one_request_with_no_body(
    s3_env: MotoS3, bucket: str, tmp_path: Path
) -> None:
    """An unchanged alias check is one conditional GET answered 304 with an empty body."""
    store = open_store(f"s3://{bucket}/models", Settings(s3_addressing_style="path", cache_dir=tmp_path))
    store.put("m/aliases/prod.json", b"x" * 600)
    _, etag = store.get("m/aliases/prod.json")
    s3_env.reset_counts()

    assert store.get_if_changed("m/aliases/prod.json", etag) == (None, etag)

    [req] = s3_env.requests
    assert (req.method, req.key, req.status, req.bytes_out) == ("GET", "models/m/aliases/prod.json", 304, 0)


def test_put_if_absent_refuses_to_overwrite(store: ObjectStore) -> None:
    store.put("v/manifest.json", b"first", if_absent=True)
    with pytest.raises(FileExistsError):
        store.put("v/manifest.json", b"second", if_absent=True)
    assert store.get("v/manifest.json")[0] == b"first"


def test_list_returns_every_object_under_a_prefix_with_sizes(store: ObjectStore) -> None:
    store.put("m/versions/1/a.bin", b"12345")
    store.put("m/versions/1/sub/b.bin", b"1")
    store.put("m/versions/10/a.bin", b"xx")
    store.put("other/x", b"")
    listed = {(o.key, o.size) for o in store.list("m/versions/1/")}
    assert listed == {("m/versions/1/a.bin", 5), ("m/versions/1/sub/b.bin", 1)}
    assert store.list("nothing/here/") == []


def test_list_dirs_returns_immediate_children_only(store: ObjectStore) -> None:
    store.put("m/versions/1/a.bin", b"1")
    store.put("m/versions/2/deep/b.bin", b"2")
    store.put("m/aliases/prod.json", b"{}")
    assert store.list_dirs("m/versions/") == ["1", "2"]
    assert store.list_dirs("m/") == ["aliases", "versions"]
    assert store.list_dirs("") == ["m"]
    assert store.list_dirs("missing/") == []


def test_exists_is_true_only_for_objects(store: ObjectStore) -> None:
    store.put("m/versions/1/a.bin", b"1")
    assert store.exists("m/versions/1/a.bin")
    assert not store.exists("m/versions/1/b.bin")
    assert not store.exists("m/versions/1")


def test_upload_then_download_streams_the_same_bytes(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(300_000))
    sent: list[int] = []
    store.upload("m/versions/1/weights.bin", src, sent.append)
    sink = io.BytesIO()
    received: list[int] = []
    store.download("m/versions/1/weights.bin", sink, received.append)
    assert sink.getvalue() == src.read_bytes()
    assert sum(sent) == sum(received) == src.stat().st_size


@pytest.mark.s3
@pytest.mark.slow
def test_large_files_go_up_and_down_in_parts_on_s3(
    s3_env: MotoS3, bucket: str, tmp_path: Path, make_settings: Any
) -> None:
    """A 12 MB file over the 5 MiB threshold is uploaded multipart and read back in ranges, in order."""
    store = open_store(f"s3://{bucket}/models", make_settings(tmp_path))
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    key = "models/m/versions/1/big.bin"

    store.upload("m/versions/1/big.bin", src)
    assert s3_env.count("PUT", bucket=bucket, key=key) >= 2  # UploadPart, one per part
    assert any("uploads" in r.query for r in s3_env.matching("POST", key=key))

    s3_env.reset_counts()
    sink = io.BytesIO()
    store.download("m/versions/1/big.bin", sink)
    assert sink.getvalue() == src.read_bytes()
    assert sum(1 for r in s3_env.matching("GET", key=key) if r.status == 206) >= 2


def test_missing_keys_raise_not_found(store: ObjectStore) -> None:
    store.put("m/present", b"1")
    with pytest.raises(errors.NotFound):
        store.get("m/absent")
    with pytest.raises(errors.NotFound):
        store.get_if_changed("m/absent", "some-etag")
    with pytest.raises(errors.NotFound):
        store.download("m/absent", io.BytesIO())


def test_not_found_is_not_a_store_failure(store: ObjectStore) -> None:
    """A missing key is the caller's NotFound, never a StoreError (which triggers offline fallback)."""
    with pytest.raises(errors.NotFound) as info:
        store.get("m/absent")
    assert not isinstance(info.value, errors.StoreError)


# -- S3 error translation --------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.faults
def test_unreachable_endpoint_is_store_unavailable(
    s3_env: MotoS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_settings: Any
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = open_store("s3://models", make_settings(tmp_path, s3_max_attempts=1))
    with pytest.raises(errors.StoreUnavailable) as info:
        store.get("m/aliases/prod.json")
    assert info.value.__cause__ is not None
    assert info.value.status_code == 503


@pytest.mark.s3
def test_rejected_credentials_are_store_access_denied(
    s3_env: MotoS3, bucket: str, tmp_path: Path, make_settings: Any
) -> None:
    """Moto checks signatures against its IAM inside require_auth(); the test keys are unknown there."""
    store = open_store(f"s3://{bucket}/models", make_settings(tmp_path))
    with s3_env.require_auth():
        with pytest.raises(errors.StoreAccessDenied) as info:
            store.get("m/aliases/prod.json")
        with pytest.raises(errors.StoreAccessDenied):
            store.put("m/aliases/prod.json", b"{}")
    from botocore.exceptions import ClientError

    assert isinstance(info.value.__cause__, ClientError)
    assert info.value.__cause__.response["Error"]["Code"] == "InvalidAccessKeyId"


@pytest.mark.s3
def test_missing_bucket_is_store_not_found(s3_env: MotoS3, tmp_path: Path, make_settings: Any) -> None:
    store = open_store("s3://no-such-bucket-here/models", make_settings(tmp_path))
    calls = (
        lambda: store.get("m/x"),
        lambda: store.list("m/"),
        lambda: store.put("m/x", b"1"),
        lambda: store.exists("m/x"),
    )
    for call in calls:
        with pytest.raises(errors.StoreNotFound) as info:
            call()
        assert info.value.__cause__ is not None


@pytest.mark.s3
def test_s3_uri_without_bucket_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidReference):
        S3Store("s3:///models", Settings(cache_dir=tmp_path))


# -- repository --------------------------------------------------------------------------


def test_published_version_is_listed_and_resolvable(repo: Repository, tmp_path: Path) -> None:
    sha = publish(repo, tmp_path, "iris", "1", {"model.bin": b"weights", "cfg/a.json": b"{}"})
    assert repo.list_models() == ["iris"]
    assert repo.list_versions("iris") == ["1"]
    resolved = repo.resolve("iris:1")
    assert resolved.manifest_sha256 == sha
    assert {f.path for f in resolved.manifest.files} == {"model.bin", "cfg/a.json"}
    assert repo.version_files("iris", "1") == {
        "model.bin": 7,
        "cfg/a.json": 2,
        MANIFEST_NAME: len(resolved.manifest_raw),
    }


def test_version_without_manifest_is_not_listed(repo: Repository, tmp_path: Path) -> None:
    """Files uploaded without a manifest (a crashed publish) are not a version."""
    publish(repo, tmp_path, "iris", "1", {"model.bin": b"one"})
    repo.store.put("iris/versions/2/model.bin", b"half-published")
    assert repo.list_versions("iris") == ["1"]
    with pytest.raises(errors.VersionNotFound):
        repo.resolve("iris:2")


def test_publish_that_fails_midway_leaves_no_version(repo: Repository, tmp_path: Path) -> None:
    """The manifest is written last: a publish that dies on a file leaves nothing visible."""
    good = tmp_path / "a.bin"
    good.write_bytes(b"a")
    gone = tmp_path / "b.bin"
    gone.write_bytes(b"b")
    files = [("a.bin", good), ("b.bin", gone)]
    manifest = Manifest(name="iris", version="1", format="raw", files=file_entries(files))
    gone.unlink()
    with pytest.raises((errors.StoreError, OSError)):
        repo.publish(manifest, files)
    assert not repo.store.exists("iris/versions/1/manifest.json")
    assert repo.list_versions("iris") == []
    gone.write_bytes(b"b")
    repo.publish(manifest, files)  # a retry is not VersionExists
    assert repo.list_versions("iris") == ["1"]


@pytest.mark.s3
def test_manifest_is_the_last_object_written_on_s3(s3_env: MotoS3, bucket: str, tmp_path: Path) -> None:
    repo = Repository(
        open_store(f"s3://{bucket}/models", Settings(s3_addressing_style="path", cache_dir=tmp_path))
    )
    publish(repo, tmp_path, "iris", "1", {"a.bin": b"a", "b.bin": b"b", "c/d.bin": b"d"})
    puts = [r.key for r in s3_env.requests if r.method == "PUT" and r.status == 200]
    assert len(puts) == 4
    assert puts[-1] == "models/iris/versions/1/manifest.json"


def test_publishing_an_existing_version_is_refused(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "iris", "1", {"model.bin": b"one"})
    with pytest.raises(errors.VersionExists):
        publish(repo, tmp_path / "again", "iris", "1", {"model.bin": b"two"})
    assert repo.store.get("iris/versions/1/model.bin")[0] == b"one"


def test_next_version_follows_the_highest_integer(repo: Repository, tmp_path: Path) -> None:
    assert repo.next_version("iris") == "1"
    for v in ("1", "2", "10", "candidate"):
        publish(repo, tmp_path, "iris", v, {"m.bin": v.encode()})
    assert repo.list_versions("iris") == ["1", "2", "10", "candidate"]
    assert repo.next_version("iris") == "11"


def test_alias_set_get_and_history(repo: Repository, tmp_path: Path) -> None:
    sha1 = publish(repo, tmp_path, "iris", "1", {"m.bin": b"1"})
    sha2 = publish(repo, tmp_path, "iris", "2", {"m.bin": b"2"})
    repo.move_alias("iris", "production", SetTarget("1"), by="alice")
    moved = repo.move_alias("iris", "production", SetTarget("2"), by="bob")
    got = repo.get_alias("iris", "production")
    assert got == moved
    assert (got.version, got.manifest_sha256, got.updated_by) == ("2", sha2, "bob")
    assert [(h.version, h.manifest_sha256, h.updated_by) for h in got.history] == [("1", sha1, "alice")]
    assert repo.list_aliases("iris") == ["production"]
    assert repo.resolve("iris@production").version == "2"
    assert repo.resolve("iris").version == "2"  # a bare name means @production


def test_rollback_moves_the_alias_to_its_previous_target(repo: Repository, tmp_path: Path) -> None:
    for v in ("1", "2", "3"):
        publish(repo, tmp_path, "iris", v, {"m.bin": v.encode()})
        repo.move_alias("iris", "production", SetTarget(v))
    assert repo.move_alias("iris", "production", Rollback()).version == "2"
    assert repo.move_alias("iris", "production", Rollback()).version == "1"
    assert repo.get_alias("iris", "production").history == []
    with pytest.raises(errors.AliasNotFound):
        repo.move_alias("iris", "production", Rollback())


def test_alias_to_a_missing_version_or_model_is_refused(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "iris", "1", {"m.bin": b"1"})
    with pytest.raises(errors.VersionNotFound):
        repo.move_alias("iris", "production", SetTarget("7"))
    with pytest.raises(errors.ModelNotFound):
        repo.move_alias("wine", "production", SetTarget("1"))
    assert repo.list_aliases("iris") == []


def test_missing_alias_is_alias_not_found(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "iris", "1", {"m.bin": b"1"})
    with pytest.raises(errors.AliasNotFound):
        repo.resolve("iris@staging")


def test_check_alias_reports_a_move_and_nothing_otherwise(repo: Repository, tmp_path: Path) -> None:
    publish(repo, tmp_path, "iris", "1", {"m.bin": b"1"})
    publish(repo, tmp_path, "iris", "2", {"m.bin": b"2"})
    repo.move_alias("iris", "production", SetTarget("1"))
    first = repo.check_alias("iris", "production", None)
    assert first.alias is not None
    assert first.alias.version == "1"
    assert repo.check_alias("iris", "production", first.etag).alias is None
    repo.move_alias("iris", "production", SetTarget("2"))
    moved = repo.check_alias("iris", "production", first.etag)
    assert moved.alias is not None
    assert moved.alias.version == "2"


def test_alias_to_a_rewritten_manifest_is_an_integrity_error(repo: Repository, tmp_path: Path) -> None:
    """The alias pins the manifest's sha256: a manifest replaced behind it is refused."""
    publish(repo, tmp_path, "iris", "1", {"m.bin": b"1"})
    repo.move_alias("iris", "production", SetTarget("1"))
    raw, _ = repo.store.get("iris/versions/1/manifest.json")
    repo.store.put("iris/versions/1/manifest.json", raw.replace(b'"format": "raw"', b'"format": "raw2"'))
    with pytest.raises(errors.IntegrityError):
        repo.resolve("iris@production")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"name": "iris", "version": "1", "format": "raw", "files": '
        b'[{"path": "../etc/passwd", "size": 1, "sha256": "' + b"0" * 64 + b'"}]}',
    ],
)
def test_unreadable_or_unsafe_stored_manifest_is_invalid(repo: Repository, body: bytes) -> None:
    repo.store.put("iris/versions/1/manifest.json", body)
    with pytest.raises(errors.InvalidManifest):
        repo.resolve("iris:1")


class _FullDisk:
    """A sink on a full disk: every write fails as a cache file's would."""

    def write(self, data: bytes) -> int:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.faults
def test_a_full_sink_is_not_reported_as_the_store_failing(store: ObjectStore) -> None:
    """A full cache disk under a local (or S3) store used to read 'cannot read from store', exit 9."""
    store.put("m/full.bin", b"x" * 1024)
    with pytest.raises(OSError, match="No space left on device") as info:
        store.download("m/full.bin", _FullDisk())  # type: ignore[arg-type]
    assert not isinstance(info.value, errors.StoreError)
